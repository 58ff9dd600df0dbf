//! Image data for eio (skeleton; filled in by the data work of issue 5).
