//! The `alloc` names every module uses, so that one import serves the `std` and the `no_std`
//! builds alike (under `std` they are the same items as the standard prelude's). Some feature
//! sets use only some of them.
#![allow(unused_imports)]
pub(crate) use alloc::boxed::Box;
pub(crate) use alloc::format;
pub(crate) use alloc::string::{String, ToString};
pub(crate) use alloc::vec;
pub(crate) use alloc::vec::Vec;
