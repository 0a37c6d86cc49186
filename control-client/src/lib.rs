//! ward-control-client
