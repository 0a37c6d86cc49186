//! ward-control-plane: in progress.
