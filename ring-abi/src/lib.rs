//! lu2k-ring-abi

#![deny(unsafe_code)]
