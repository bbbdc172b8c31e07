//! Bittensor keyfiles: plain JSON and `$NACL`-encrypted JSON.
//!
//! Plain keyfile (btwallet `serialized_keypair_to_keyfile_data`):
//! `{"accountId":"0x…","publicKey":"0x…","privateKey":"0x<64 bytes>","secretPhrase":"…","secretSeed":"0x<32 bytes>","ss58Address":"5…"}`.
//!
//! Encrypted keyfile (btwallet `encrypt_keyfile_data`): `b"$NACL" ‖ nonce (24) ‖ secretbox(plain JSON)`,
//! where secretbox is XSalsa20-Poly1305 with the Poly1305 tag first (libsodium `crypto_secretbox_easy`) and
//! the key is `argon2i` v1.3 (libsodium `crypto_pwhash_argon2i`, OPSLIMIT_SENSITIVE = 8 passes,
//! MEMLIMIT_SENSITIVE = 512 MiB, one lane) over the password with btwallet's fixed 16-byte salt.

use std::path::Path;

use serde::Deserialize;
use xsalsa20poly1305::aead::{Aead, KeyInit};
use xsalsa20poly1305::{Key, Nonce, XSalsa20Poly1305};
use zeroize::Zeroizing;

use crate::KeyError;

/// btwallet's fixed salt for `$NACL` keyfiles (`NACL_SALT` in btwallet `keyfile.rs`).
pub(crate) const NACL_SALT: [u8; 16] = [
    0x13, 0x71, 0x83, 0xdf, 0xf1, 0x5a, 0x09, 0xbc, 0x9c, 0x90, 0xb5, 0x51, 0x87, 0x39, 0xe9, 0xb1,
];
const NACL_PREFIX: &[u8] = b"$NACL";
const NONCE_LEN: usize = 24;

/// argon2i cost parameters of a `$NACL` keyfile.
#[derive(Debug, Clone, Copy)]
pub struct NaclKdf {
    /// Memory in KiB.
    pub mem_kib: u32,
    /// Passes.
    pub passes: u32,
}

impl NaclKdf {
    /// libsodium's `crypto_pwhash_argon2i_{OPS,MEM}LIMIT_SENSITIVE`, which btwallet uses.
    pub const BTWALLET: NaclKdf = NaclKdf {
        mem_kib: 512 * 1024,
        passes: 8,
    };

    fn derive(&self, password: &[u8]) -> Result<Zeroizing<[u8; 32]>, String> {
        let params = argon2::Params::new(self.mem_kib, self.passes, 1, Some(32))
            .map_err(|e| format!("argon2 parameters: {e}"))?;
        let kdf = argon2::Argon2::new(argon2::Algorithm::Argon2i, argon2::Version::V0x13, params);
        let mut key = Zeroizing::new([0u8; 32]);
        kdf.hash_password_into(password, &NACL_SALT, key.as_mut())
            .map_err(|e| format!("argon2: {e}"))?;
        Ok(key)
    }
}

/// How a keyfile is protected, judged from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyfileEncryption {
    None,
    Nacl,
    AnsibleVault,
    LegacyFernet,
}

pub fn encryption_of(data: &[u8]) -> KeyfileEncryption {
    if data.starts_with(NACL_PREFIX) {
        KeyfileEncryption::Nacl
    } else if data.starts_with(b"$ANSIBLE_VAULT") {
        KeyfileEncryption::AnsibleVault
    } else if data.starts_with(b"gAAAAA") {
        KeyfileEncryption::LegacyFernet
    } else {
        KeyfileEncryption::None
    }
}

/// Decrypts a `$NACL` keyfile. `Ok(None)` means the password is wrong (or the file was altered).
pub(crate) fn nacl_decrypt(
    data: &[u8],
    password: &[u8],
    kdf: NaclKdf,
) -> Result<Option<Zeroizing<Vec<u8>>>, String> {
    let body = data
        .strip_prefix(NACL_PREFIX)
        .ok_or_else(|| "missing $NACL prefix".to_owned())?;
    if body.len() < NONCE_LEN + 16 {
        return Err("encrypted keyfile is truncated".to_owned());
    }
    let (nonce, ciphertext) = body.split_at(NONCE_LEN);
    let key = kdf.derive(password)?;
    let cipher = XSalsa20Poly1305::new(Key::from_slice(key.as_ref()));
    Ok(cipher
        .decrypt(Nonce::from_slice(nonce), ciphertext)
        .ok()
        .map(Zeroizing::new))
}

/// Encrypts keyfile JSON the way btwallet does (`$NACL` format), with the given KDF cost.
pub fn nacl_encrypt(plain: &[u8], password: &[u8], kdf: NaclKdf) -> Result<Vec<u8>, String> {
    let key = kdf.derive(password)?;
    let cipher = XSalsa20Poly1305::new(Key::from_slice(key.as_ref()));
    let mut nonce = [0u8; NONCE_LEN];
    getrandom_nonce(&mut nonce);
    let ct = cipher
        .encrypt(Nonce::from_slice(&nonce), plain)
        .map_err(|_| "encrypt keyfile".to_owned())?;
    let mut out = NACL_PREFIX.to_vec();
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

fn getrandom_nonce(nonce: &mut [u8; NONCE_LEN]) {
    // schnorrkel's MiniSecretKey::generate draws from the OS RNG; reuse it instead of another RNG crate.
    let a = schnorrkel::MiniSecretKey::generate().to_bytes();
    nonce.copy_from_slice(&a[..NONCE_LEN]);
}

/// The fields of a keyfile JSON (all optional; unknown fields ignored). Secret fields are zeroized on drop.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(crate) struct KeyfileJson {
    #[serde(default)]
    pub public_key: Option<String>,
    #[serde(default)]
    pub account_id: Option<String>,
    #[serde(default)]
    pub private_key: Option<Zeroizing<String>>,
    #[serde(default)]
    pub secret_phrase: Option<Zeroizing<String>>,
    #[serde(default)]
    pub secret_seed: Option<Zeroizing<String>>,
    #[serde(default)]
    pub ss58_address: Option<String>,
}

pub(crate) fn parse_json(data: &[u8], path: &Path) -> Result<KeyfileJson, KeyError> {
    // serde_json's error text may quote input; report only its position.
    serde_json::from_slice::<KeyfileJson>(data).map_err(|e| KeyError::Malformed {
        path: path.to_owned(),
        reason: format!(
            "not keyfile JSON (line {}, column {})",
            e.line(),
            e.column()
        ),
    })
}

/// Decodes `0x`-prefixed (or bare) hex into exactly N bytes.
pub(crate) fn hex_n<const N: usize>(s: &str) -> Option<Zeroizing<[u8; N]>> {
    let s = s.trim();
    let s = s.strip_prefix("0x").unwrap_or(s);
    let mut out = Zeroizing::new([0u8; N]);
    hex::decode_to_slice(s, out.as_mut()).ok()?;
    Some(out)
}

/// A warning when the keyfile can be read by group or others (Unix permission bits).
pub(crate) fn permission_warning(path: &Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode();
        if mode & 0o044 != 0 {
            return Some(format!(
                "keyfile {} is readable by group or others (mode {:o}); run chmod 600 on it",
                path.display(),
                mode & 0o777
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    None
}
