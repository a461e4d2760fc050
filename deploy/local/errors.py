"""The one exception the local cluster raises."""


class InfraError(RuntimeError):
    """A local-cluster operation failed.

    The message names the component and says what to do next (install something, free a port, read
    the quoted log lines), because it is shown to a developer as-is, without a traceback.
    """
