"""KFP pipelines and where they run: ``kfp.local`` on this machine (``local``), ``kfp.Client`` on a cluster (``cluster``).

The submodules are imported on use: ``kfp`` is heavy, and the CLI loads it only for commands that need it.
"""

__all__: list[str] = []
