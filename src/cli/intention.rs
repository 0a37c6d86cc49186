//! `ward intention`: to be written.
