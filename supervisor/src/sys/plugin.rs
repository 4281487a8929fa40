//! Loading a driver plugin (`dlopen`) and reading its magic block. Used only inside the
//! sandboxed driver host process, never in `capnetd`: loading runs the plugin's code.
//!
//! The plugin is never unloaded (`dlclose` of a Rust library with thread-local destructors
//! is unsound); the driver host process's exit unloads it.

use std::ffi::{CStr, c_int};
use std::os::fd::{IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use capnet_driver_api::abi::{
    ABI_MAJOR, MAGIC, MAGIC_SYMBOL, MagicBlock, MagicFn, PROTOCOL_SCHEMA_ID, SERVE_SYMBOL, ServeFn,
};
use capnet_driver_api::manifest::{Manifest, ManifestError};
use serde::{Deserialize, Serialize};

/// Why a plugin was refused. Messages name the file and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum LoadPluginError {
    /// `dlopen` failed: not an ELF shared object, wrong architecture, missing libraries.
    #[error(
        "{path}: cannot be loaded as a shared object ({reason}); expected a capnet driver plugin \
         (an ELF cdylib built with capnet-driver-api)"
    )]
    Open {
        /// The plugin as the administrator named it.
        path: PathBuf,
        /// The loader's message.
        reason: String,
    },
    /// A required symbol is missing.
    #[error(
        "{path}: does not export {symbol}; it is not a capnet driver plugin (plugins export it \
         with capnet_driver_api::export_driver!)"
    )]
    MissingSymbol {
        /// The plugin.
        path: PathBuf,
        /// The missing symbol.
        symbol: &'static str,
    },
    /// The magic block is null, has the wrong magic or is too short.
    #[error("{path}: {reason}; expected a magic block starting with \"CAPNETDR\"")]
    BadMagic {
        /// The plugin.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The plugin was built for another ABI major version.
    #[error(
        "{path}: built for driver ABI {found_major}.{found_minor}, but this capnet supports ABI \
         {expected}.x; rebuild the plugin against capnet-driver-api {expected}.x"
    )]
    AbiMismatch {
        /// The plugin.
        path: PathBuf,
        /// The plugin's major version.
        found_major: u16,
        /// The plugin's minor version.
        found_minor: u16,
        /// The major version this host speaks.
        expected: u16,
    },
    /// The plugin speaks another driver protocol.
    #[error(
        "{path}: speaks driver protocol {found:#x}, expected {expected:#x}; rebuild the plugin \
         against this capnet's capnet-driver-api"
    )]
    ProtocolMismatch {
        /// The plugin.
        path: PathBuf,
        /// The plugin's schema ID.
        found: u64,
        /// Ours.
        expected: u64,
    },
    /// The manifest does not decode.
    #[error("{path}: its manifest is unreadable: {source}")]
    Manifest {
        /// The plugin.
        path: PathBuf,
        /// Why.
        source: ManifestError,
    },
}

/// What a plugin says it is, read from its magic block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginIdentity {
    /// Name from the magic block.
    pub name: String,
    /// Version from the magic block.
    pub version: String,
    /// ABI major.
    pub abi_major: u16,
    /// ABI minor.
    pub abi_minor: u16,
    /// Driver protocol schema ID.
    pub protocol_schema_id: u64,
    /// The manifest.
    pub manifest: Manifest,
}

/// A loaded plugin.
pub struct LoadedPlugin {
    path: PathBuf,
    magic: MagicFn,
    serve: ServeFn,
}

/// Loads the plugin at `load_path` (for example `/proc/self/fd/4`, a sealed memfd holding
/// exactly the bytes the supervisor hashed). `display` names it in messages.
pub fn load(load_path: &Path, display: &Path) -> Result<LoadedPlugin, LoadPluginError> {
    // SAFETY: loading a library runs its initialisers. This happens only in the sandboxed
    // driver host, whose whole purpose is to run the approved plugin's code; the library
    // is never unloaded (we forget it below), so symbols stay valid for the process life.
    let lib =
        unsafe { libloading::Library::new(load_path) }.map_err(|e| LoadPluginError::Open {
            path: display.to_path_buf(),
            reason: e.to_string(),
        })?;
    // SAFETY: the symbol types match the ABI contract of capnet_driver_api::abi; a plugin
    // that exports them with other types breaks that contract, and the consequences stay
    // inside this sandboxed process.
    let magic = unsafe { lib.get::<MagicFn>(MAGIC_SYMBOL) }
        .map(|s| *s)
        .map_err(|_| LoadPluginError::MissingSymbol {
            path: display.to_path_buf(),
            symbol: "capnet_driver_magic",
        })?;
    // SAFETY: as above.
    let serve = unsafe { lib.get::<ServeFn>(SERVE_SYMBOL) }
        .map(|s| *s)
        .map_err(|_| LoadPluginError::MissingSymbol {
            path: display.to_path_buf(),
            symbol: "capnet_driver_serve",
        })?;
    // Never dlclose: keep the library mapped until the process exits.
    std::mem::forget(lib);
    Ok(LoadedPlugin {
        path: display.to_path_buf(),
        magic,
        serve,
    })
}

impl LoadedPlugin {
    /// Reads and checks the magic block.
    pub fn identity(&self) -> Result<PluginIdentity, LoadPluginError> {
        let bad = |reason: &str| LoadPluginError::BadMagic {
            path: self.path.clone(),
            reason: reason.to_string(),
        };
        // SAFETY: calling the plugin's exported magic function, whose type is fixed by the
        // ABI; it takes no arguments and returns a pointer we check before use.
        let ptr = unsafe { (self.magic)() };
        if ptr.is_null() {
            return Err(bad(
                "capnet_driver_magic returned null (the plugin failed to describe itself)",
            ));
        }
        // SAFETY: a non-null pointer from the plugin's magic function points to its static
        // magic block; the first 12 bytes (magic and struct_len) exist in every ABI version.
        let (magic, struct_len) = unsafe { ((*ptr).magic, (*ptr).struct_len) };
        if magic != MAGIC {
            return Err(bad("the magic bytes are wrong"));
        }
        // SAFETY: as above; abi_major/minor follow struct_len in every version.
        let (abi_major, abi_minor) = unsafe { ((*ptr).abi_major, (*ptr).abi_minor) };
        if abi_major != ABI_MAJOR {
            return Err(LoadPluginError::AbiMismatch {
                path: self.path.clone(),
                found_major: abi_major,
                found_minor: abi_minor,
                expected: ABI_MAJOR,
            });
        }
        if (struct_len as usize) < std::mem::size_of::<MagicBlock>() {
            return Err(bad(&format!(
                "the magic block is {struct_len} bytes, shorter than the {} of ABI {ABI_MAJOR}",
                std::mem::size_of::<MagicBlock>()
            )));
        }
        // SAFETY: struct_len shows the whole version-1 block exists; its pointers point to
        // NUL-terminated strings and a byte buffer of manifest_len bytes owned by the plugin
        // for the life of the process (ABI contract).
        let block = unsafe { &*ptr };
        if block.protocol_schema_id != PROTOCOL_SCHEMA_ID {
            return Err(LoadPluginError::ProtocolMismatch {
                path: self.path.clone(),
                found: block.protocol_schema_id,
                expected: PROTOCOL_SCHEMA_ID,
            });
        }
        if block.name.is_null() || block.version.is_null() || block.manifest.is_null() {
            return Err(bad("the magic block has a null field"));
        }
        // SAFETY: non-null, NUL-terminated per the ABI (see above).
        let name = unsafe { CStr::from_ptr(block.name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: as above.
        let version = unsafe { CStr::from_ptr(block.version) }
            .to_string_lossy()
            .into_owned();
        if block.manifest_len > 1 << 20 {
            return Err(bad("the manifest is larger than 1 MiB"));
        }
        // SAFETY: non-null and manifest_len bytes long per the ABI; bounded above.
        let bytes = unsafe { std::slice::from_raw_parts(block.manifest, block.manifest_len) };
        let manifest =
            Manifest::from_message(bytes).map_err(|source| LoadPluginError::Manifest {
                path: self.path.clone(),
                source,
            })?;
        Ok(PluginIdentity {
            name,
            version,
            abi_major,
            abi_minor,
            protocol_schema_id: block.protocol_schema_id,
            manifest,
        })
    }

    /// Hands `socket` to the plugin and serves until the supervisor disconnects. Returns the
    /// plugin's status code (see `capnet_driver_api::abi::serve_status`).
    pub fn serve(&self, socket: OwnedFd) -> c_int {
        let fd = socket.into_raw_fd();
        // SAFETY: `fd` is an open, connected stream socket whose ownership we give up (it was
        // turned into a raw fd just above and is not used again), as the ABI requires.
        unsafe { (self.serve)(fd) }
    }
}
