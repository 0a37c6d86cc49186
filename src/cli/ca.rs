//! `ward ca`: to be written.
