"""What runs on a cluster: the loop's objects rendered from the policy (``render``), checked against the
upstream CRDs (``schemas``) and applied (``deploy``); ``base/`` and ``overlays/`` hold the kustomize tree."""

__all__: list[str] = []
