//! lu2k-engine

#![deny(unsafe_code)]
