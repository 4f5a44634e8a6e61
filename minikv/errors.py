"""The one exception type for errors a user can cause and fix."""


class MinikvError(Exception):
    """A user-fixable problem (bad path, unsupported model, corrupt file, context overflow,
    out of memory). The message says what is wrong and what to do; the CLI prints it on one
    line and exits with status 2."""


NON_FINITE = ("the model's output is not finite (NaN or inf): its weights are damaged, or its values overflow "
              "float16 (try --dtype float32)")
