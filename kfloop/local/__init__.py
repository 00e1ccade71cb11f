"""The loop on one machine: supervised processes (``supervisor``), the serving runtime and its admin API
(``runtime``), and the stack that assembles serving, watch, trigger and autoscaler (``stack``)."""

__all__: list[str] = []
