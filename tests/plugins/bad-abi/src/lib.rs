//! A plugin built "for ABI 99": the host must refuse it before calling `serve`.

use std::ffi::c_int;

use capnet_driver_api::abi::{MAGIC, MagicBlock, PROTOCOL_SCHEMA_ID};

struct Block(MagicBlock);

// SAFETY: the block only points to static, immutable data.
unsafe impl Sync for Block {}

static MANIFEST: [u8; 0] = [];

static BLOCK: Block = Block(MagicBlock {
    magic: MAGIC,
    struct_len: std::mem::size_of::<MagicBlock>() as u32,
    abi_major: 99,
    abi_minor: 0,
    protocol_schema_id: PROTOCOL_SCHEMA_ID,
    name: c"bad-abi".as_ptr(),
    version: c"9.9.9".as_ptr(),
    manifest: MANIFEST.as_ptr(),
    manifest_len: 0,
});

/// The magic block, claiming ABI 99.
#[unsafe(no_mangle)]
pub extern "C" fn capnet_driver_magic() -> *const MagicBlock {
    &BLOCK.0
}

/// Never reached: the host refuses the plugin first.
#[unsafe(no_mangle)]
pub extern "C" fn capnet_driver_serve(_fd: c_int) -> c_int {
    1
}
