//! ward-proto: in progress.
