//! `ward catalog`: to be written.
