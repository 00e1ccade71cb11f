"""KFP pipelines and where they run: ``kfp.local`` on this machine, ``kfp.Client`` on a cluster."""
