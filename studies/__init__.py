"""Task studies built on the generic pipeline (train/): one folder per study."""
