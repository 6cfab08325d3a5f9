//! lu2k-kshim

#![deny(unsafe_code)]
