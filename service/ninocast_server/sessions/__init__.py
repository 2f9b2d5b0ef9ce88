"""Sessions of training runs, the work behind the HTTP routes: one call per nowcast (``nowcast.py``) and per new
session (``create.py``), the on-disk store, upload validation and the compute queue that runs nowcasts."""
