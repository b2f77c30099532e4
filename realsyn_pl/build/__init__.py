"""Dataset construction (RealSyn stage 1+): a chain of resumable stages; see data_build/README.md."""
