//! lu2k-udt

#![deny(unsafe_code)]
