//! ward-perf
