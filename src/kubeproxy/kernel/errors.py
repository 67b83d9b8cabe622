"""Error taxonomy of the kernel boundary: adapters translate every OS/subprocess failure once."""


class KernelError(Exception):
    """Programming or reading kernel state failed; the message says what was attempted."""
