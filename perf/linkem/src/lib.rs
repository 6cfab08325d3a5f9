//! lu2k-linkem

#![deny(unsafe_code)]
