//! eio-spec
