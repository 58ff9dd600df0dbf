//! PyTorch interoperability for eio (skeleton; filled in by issue 6).
