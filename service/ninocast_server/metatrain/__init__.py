"""Meta-training: collect trajectories, store them, train NiNo / WNN+ nowcasters on them (docs/metatrain.md)."""
