//! `ward server` configuration (see PRODUCT.md "Server config"); in progress.
