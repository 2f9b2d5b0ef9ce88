"""Sessions of training runs: the on-disk store, upload validation and the compute queue that runs nowcasts."""
