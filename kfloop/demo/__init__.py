"""``kfloop demo``: the automation table played end to end -- the scenario (``scenario``), its client
traffic (``traffic``), the live display (``view``) and the HTML report with charts (``report``)."""

__all__: list[str] = []
