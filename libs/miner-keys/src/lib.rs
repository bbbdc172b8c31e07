//! Bittensor wallet keys: hotkey keyfiles, sr25519 signing (context `b"substrate"`) and SS58 addresses.
//!
//! Wallet layout (bittensor / btwallet): `<wallet path>/<coldkey>/hotkeys/<hotkey>` holds the hotkey keyfile
//! (JSON, optionally `$NACL`-encrypted) and `<wallet path>/<coldkey>/coldkeypub.txt` the coldkey's public part.
//!
//! **Invariant:** secrets never leave this crate in text form: `Debug`/`Display` of [`Hotkey`] show only the
//! address, and no [`KeyError`] quotes keyfile contents, passwords or URIs.

mod derive;
mod keyfile;
mod ss58;

use std::fmt;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use base64::Engine;
use schnorrkel::{ExpansionMode, Keypair, MiniSecretKey, PublicKey, SecretKey, Signature};
use zeroize::Zeroizing;

pub use keyfile::{KeyfileEncryption, NaclKdf, encryption_of, nacl_encrypt};
pub use ss58::{
    SS58_FORMAT_BITTENSOR, Ss58Error, ss58_decode, ss58_decode_with_format, ss58_encode,
    ss58_encode_with_format,
};

/// The signing context of Substrate's sr25519 (`sp_core::sr25519`).
pub const SIGNING_CONTEXT: &[u8] = b"substrate";

/// Errors loading keys. Messages name the file and the problem, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("keyfile {path}: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("keyfile {path} is encrypted and no password was given ({hint})")]
    PasswordRequired { path: PathBuf, hint: String },
    #[error("decrypt keyfile {path}: wrong password or corrupted file")]
    WrongPassword { path: PathBuf },
    #[error(
        "keyfile {path} uses {kind} encryption, which is not supported; re-encrypt it with btcli (NaCl)"
    )]
    UnsupportedEncryption { path: PathBuf, kind: &'static str },
    #[error("keyfile {path} holds no secret key (only a public key)")]
    NoSecret { path: PathBuf },
    #[error(transparent)]
    Ss58(#[from] Ss58Error),
    #[error("parse secret URI: {0}")]
    BadUri(String),
    #[error("{what} name {name:?} is not a wallet name (no '/', '.', '..' or empty names)")]
    BadWalletName { what: &'static str, name: String },
    #[error("password file {path}: {reason}")]
    PasswordFile { path: PathBuf, reason: String },
}

/// Refuses a coldkey or hotkey name that would leave `<wallet>/<coldkey>/hotkeys/`: empty,
/// `.`, `..`, or with a `/`, a `\\` or a NUL.
pub fn check_wallet_name(what: &'static str, name: &str) -> Result<(), KeyError> {
    let bad = name.is_empty()
        || name == "."
        || name == ".."
        || name.contains(['/', '\\', '\0'])
        || name.chars().any(char::is_control);
    if bad {
        return Err(KeyError::BadWalletName {
            what,
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Where the password of an encrypted hotkey comes from, in this order: a file
/// (`--wallet-password-file`), a systemd credential (`$CREDENTIALS_DIRECTORY/<credential>`,
/// from `LoadCredential=`), an environment variable, the terminal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PasswordSource {
    /// A file holding the password (one line; a trailing newline is dropped). Refused when
    /// group or others can read it.
    pub file: Option<PathBuf>,
    /// The name of a systemd credential, read from `credentials_dir` when that holds it.
    pub credential: Option<String>,
    /// systemd's `$CREDENTIALS_DIRECTORY` (see [`PasswordSource::credentials_dir_from_env`]).
    pub credentials_dir: Option<PathBuf>,
    /// The name of an environment variable holding the password.
    pub env: Option<String>,
}

/// The password in a file, without its trailing newline.
fn read_password_file(path: &Path, check_mode: bool) -> Result<Zeroizing<String>, KeyError> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let bad = |reason: String| KeyError::PasswordFile {
        path: path.to_owned(),
        reason,
    };
    let mut f = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mode = f
        .metadata()
        .map_err(|e| bad(e.to_string()))?
        .permissions()
        .mode()
        & 0o777;
    if check_mode && mode & 0o077 != 0 {
        return Err(bad(format!(
            "readable by others (mode {mode:o}); run `chmod 600 {}`",
            path.display()
        )));
    }
    // Room for the whole read up front, so no reallocation leaves a copy behind.
    let mut raw = Zeroizing::new(Vec::with_capacity((64 << 10) + 1));
    f.by_ref()
        .take(64 << 10)
        .read_to_end(&mut raw)
        .map_err(|e| bad(e.to_string()))?;
    let mut end = raw.len();
    if raw[..end].ends_with(b"\n") {
        end -= 1;
        if raw[..end].ends_with(b"\r") {
            end -= 1;
        }
    }
    let text = std::str::from_utf8(&raw[..end]).map_err(|_| bad("not UTF-8".into()))?;
    if text.is_empty() {
        return Err(bad("empty".into()));
    }
    Ok(Zeroizing::new(text.to_owned()))
}

impl PasswordSource {
    /// `$CREDENTIALS_DIRECTORY`, set by systemd for a unit with `LoadCredential=`.
    pub fn credentials_dir_from_env() -> Option<PathBuf> {
        std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from)
    }

    /// The systemd credential's path, when one is configured and present.
    pub fn credential_path(&self) -> Option<PathBuf> {
        let name = self.credential.as_deref()?;
        if check_wallet_name("credential", name).is_err() {
            return None;
        }
        let p = self.credentials_dir.as_deref()?.join(name);
        p.is_file().then_some(p)
    }

    /// The password for the encrypted keyfile at `keyfile` (named in errors).
    pub fn obtain(&self, keyfile: &Path) -> Result<Zeroizing<String>, KeyError> {
        if let Some(f) = &self.file {
            return read_password_file(f, true);
        }
        if let Some(c) = self.credential_path() {
            // systemd owns the credential's mode; it is readable by this service only.
            return read_password_file(&c, false);
        }
        obtain_password(keyfile, self.env.as_deref())
    }
}

/// A hotkey: an sr25519 key pair that signs messages and extrinsics.
#[derive(Clone)]
pub struct Hotkey {
    keypair: Keypair,
    ss58: String,
    warnings: Vec<String>,
}

impl fmt::Debug for Hotkey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hotkey")
            .field("ss58", &self.ss58)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl fmt::Display for Hotkey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.ss58)
    }
}

/// Expands a leading `~/` with `$HOME`.
pub fn expand_home(path: &Path) -> PathBuf {
    if let Ok(rest) = path.strip_prefix("~")
        && let Some(home) = std::env::var_os("HOME")
    {
        return PathBuf::from(home).join(rest);
    }
    path.to_owned()
}

/// `<wallet path>/<coldkey>/hotkeys/<hotkey>`.
pub fn hotkey_path(wallet_path: &Path, coldkey: &str, hotkey: &str) -> PathBuf {
    expand_home(wallet_path)
        .join(coldkey)
        .join("hotkeys")
        .join(hotkey)
}

impl Hotkey {
    fn from_keypair(keypair: Keypair) -> Hotkey {
        let ss58 = ss58_encode(&keypair.public.to_bytes());
        Hotkey {
            keypair,
            ss58,
            warnings: Vec::new(),
        }
    }

    /// Loads `<wallet_path>/<coldkey>/hotkeys/<hotkey>`. An encrypted keyfile takes its password from the
    /// environment variable `password_env` (when given and set), else from a prompt on the terminal.
    /// Warns (tracing and [`Hotkey::warnings`]) when the file is readable by group or others.
    pub fn load(
        wallet_path: &Path,
        coldkey: &str,
        hotkey: &str,
        password_env: Option<&str>,
    ) -> Result<Hotkey, KeyError> {
        let source = PasswordSource {
            env: password_env.map(str::to_owned),
            ..PasswordSource::default()
        };
        Self::load_from(wallet_path, coldkey, hotkey, &source)
    }

    /// As [`Hotkey::load`], the password of an encrypted keyfile taken from `source`.
    pub fn load_from(
        wallet_path: &Path,
        coldkey: &str,
        hotkey: &str,
        source: &PasswordSource,
    ) -> Result<Hotkey, KeyError> {
        check_wallet_name("coldkey", coldkey)?;
        check_wallet_name("hotkey", hotkey)?;
        let path = hotkey_path(wallet_path, coldkey, hotkey);
        let data = read_keyfile(&path)?;
        let password = if encryption_of(&data) == KeyfileEncryption::Nacl {
            Some(source.obtain(&path)?)
        } else {
            None
        };
        Hotkey::load_data(&path, &data, password.as_ref().map(|p| p.as_str()))
    }

    /// As [`Hotkey::load`] with the password given directly (used only if the keyfile is encrypted).
    pub fn load_with_password(
        wallet_path: &Path,
        coldkey: &str,
        hotkey: &str,
        password: &str,
    ) -> Result<Hotkey, KeyError> {
        let path = hotkey_path(wallet_path, coldkey, hotkey);
        let data = read_keyfile(&path)?;
        Hotkey::load_data(&path, &data, Some(password))
    }

    fn load_data(path: &Path, data: &[u8], password: Option<&str>) -> Result<Hotkey, KeyError> {
        let mut key = Hotkey::from_keyfile_data_with_kdf(data, path, password, NaclKdf::BTWALLET)?;
        if let Some(w) = keyfile::permission_warning(path) {
            tracing::warn!("{w}");
            key.warnings.push(w);
        }
        Ok(key)
    }

    /// Parses keyfile bytes (plain or `$NACL` with btwallet's KDF cost). `origin` names the file in errors.
    pub fn from_keyfile_data(
        data: &[u8],
        origin: &Path,
        password: Option<&str>,
    ) -> Result<Hotkey, KeyError> {
        Hotkey::from_keyfile_data_with_kdf(data, origin, password, NaclKdf::BTWALLET)
    }

    /// As [`Hotkey::from_keyfile_data`] with an explicit argon2i cost (tests use a cheap one).
    pub fn from_keyfile_data_with_kdf(
        data: &[u8],
        origin: &Path,
        password: Option<&str>,
        kdf: NaclKdf,
    ) -> Result<Hotkey, KeyError> {
        let plain: Zeroizing<Vec<u8>> = match encryption_of(data) {
            KeyfileEncryption::None => Zeroizing::new(data.to_vec()),
            KeyfileEncryption::Nacl => {
                let password = password.ok_or_else(|| KeyError::PasswordRequired {
                    path: origin.to_owned(),
                    hint: "no password source".to_owned(),
                })?;
                keyfile::nacl_decrypt(data, password.as_bytes(), kdf)
                    .map_err(|reason| KeyError::Malformed {
                        path: origin.to_owned(),
                        reason,
                    })?
                    .ok_or_else(|| KeyError::WrongPassword {
                        path: origin.to_owned(),
                    })?
            }
            KeyfileEncryption::AnsibleVault => {
                return Err(KeyError::UnsupportedEncryption {
                    path: origin.to_owned(),
                    kind: "ansible-vault",
                });
            }
            KeyfileEncryption::LegacyFernet => {
                return Err(KeyError::UnsupportedEncryption {
                    path: origin.to_owned(),
                    kind: "legacy fernet",
                });
            }
        };
        let json = keyfile::parse_json(&plain, origin)?;
        keypair_from_json(&json, origin).map(Hotkey::from_keypair)
    }

    /// A key from a 32-byte mini-secret seed in hex (`0x` optional), like `sp_core::sr25519::Pair::from_seed`.
    pub fn from_seed_hex(seed_hex: &str) -> Result<Hotkey, KeyError> {
        let seed = keyfile::hex_n::<32>(seed_hex)
            .ok_or_else(|| KeyError::BadUri("seed is not 32 bytes of hex".to_owned()))?;
        Ok(Hotkey::from_keypair(expand_seed(&seed)?))
    }

    /// A key from a Substrate secret URI: `[<phrase>|0x<seed>][//hard...][///password]`; an empty phrase is
    /// the development phrase, so `//Alice`, `//Bob` are the well-known dev keys. Soft junctions are refused.
    pub fn from_uri(uri: &str) -> Result<Hotkey, KeyError> {
        derive::keypair_from_uri(uri).map(Hotkey::from_keypair)
    }

    /// The SS58 address (format 42).
    pub fn ss58(&self) -> &str {
        &self.ss58
    }

    /// The 32-byte public key (the account id).
    pub fn public(&self) -> [u8; 32] {
        self.keypair.public.to_bytes()
    }

    /// Signs `msg` with context `b"substrate"`; signatures are randomized.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.keypair.sign_simple(SIGNING_CONTEXT, msg).to_bytes()
    }

    /// Warnings found while loading (e.g. a keyfile readable by others).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
}

fn read_keyfile(path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|source| KeyError::Io {
            path: path.to_owned(),
            source,
        })
}

fn obtain_password(path: &Path, password_env: Option<&str>) -> Result<Zeroizing<String>, KeyError> {
    if let Some(var) = password_env
        && let Ok(p) = std::env::var(var)
    {
        return Ok(Zeroizing::new(p));
    }
    let hint = match password_env {
        Some(var) => format!("set the environment variable {var}"),
        None => {
            "pass --wallet-password-file, a systemd credential or a password environment variable"
                .to_owned()
        }
    };
    if std::io::stdin().is_terminal() {
        let prompt = format!("Password for {}: ", path.display());
        return rpassword::prompt_password(prompt)
            .map(Zeroizing::new)
            .map_err(|e| KeyError::PasswordRequired {
                path: path.to_owned(),
                hint: format!("{hint}; the prompt failed: {e}"),
            });
    }
    Err(KeyError::PasswordRequired {
        path: path.to_owned(),
        hint,
    })
}

fn expand_seed(seed: &[u8; 32]) -> Result<Keypair, KeyError> {
    MiniSecretKey::from_bytes(seed)
        .map(|m| m.expand_to_keypair(ExpansionMode::Ed25519))
        .map_err(|_| KeyError::BadUri("invalid seed".to_owned()))
}

fn malformed(path: &Path, reason: &str) -> KeyError {
    KeyError::Malformed {
        path: path.to_owned(),
        reason: reason.to_owned(),
    }
}

/// Builds the key pair from a keyfile JSON: `secretSeed`, else `secretPhrase`, else `privateKey`;
/// then checks it against `publicKey`/`accountId`/`ss58Address` when present.
fn keypair_from_json(json: &keyfile::KeyfileJson, path: &Path) -> Result<Keypair, KeyError> {
    let expected_public: Option<[u8; 32]> =
        match (&json.public_key, &json.account_id, &json.ss58_address) {
            (Some(h), _, _) | (None, Some(h), _) => Some(
                *keyfile::hex_n::<32>(h)
                    .ok_or_else(|| malformed(path, "publicKey is not 32 bytes of hex"))?,
            ),
            (None, None, Some(a)) => Some(
                ss58_decode(a)
                    .map_err(|_| malformed(path, "ss58Address is not a valid format-42 address"))?,
            ),
            (None, None, None) => None,
        };
    let keypair = if let Some(seed) = &json.secret_seed {
        let seed = keyfile::hex_n::<32>(seed)
            .ok_or_else(|| malformed(path, "secretSeed is not 32 bytes of hex"))?;
        expand_seed(&seed).map_err(|_| malformed(path, "secretSeed is not a valid seed"))?
    } else if let Some(phrase) = &json.secret_phrase {
        derive::keypair_from_phrase(phrase, "")
            .map_err(|_| malformed(path, "secretPhrase is not a valid BIP39 English phrase"))?
    } else if let Some(private) = &json.private_key {
        let bytes = keyfile::hex_n::<64>(private)
            .ok_or_else(|| malformed(path, "privateKey is not 64 bytes of hex"))?;
        // btwallet writes the canonical schnorrkel encoding; accept the ed25519-style one too.
        let candidates = [
            SecretKey::from_bytes(bytes.as_ref()).ok(),
            SecretKey::from_ed25519_bytes(bytes.as_ref()).ok(),
        ];
        let mut chosen = None;
        for secret in candidates.into_iter().flatten() {
            let kp = secret.to_keypair();
            if expected_public.is_none_or(|p| p == kp.public.to_bytes()) {
                chosen = Some(kp);
                break;
            }
        }
        chosen
            .ok_or_else(|| malformed(path, "privateKey does not match the keyfile's public key"))?
    } else {
        return Err(KeyError::NoSecret {
            path: path.to_owned(),
        });
    };
    if let Some(p) = expected_public
        && p != keypair.public.to_bytes()
    {
        return Err(malformed(
            path,
            "secret does not match the keyfile's public key",
        ));
    }
    if let (Some(a), Some(_)) = (&json.ss58_address, &expected_public)
        && ss58_decode(a).ok() != Some(keypair.public.to_bytes())
    {
        return Err(malformed(path, "ss58Address does not match the secret"));
    }
    Ok(keypair)
}

/// Verifies an sr25519 signature (context `b"substrate"`) over `msg`, or — like bittensor's
/// `Keypair.verify` — over `b"<Bytes>" ‖ msg ‖ b"</Bytes>"`.
pub fn verify(public: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> bool {
    let (Ok(pk), Ok(sig)) = (PublicKey::from_bytes(public), Signature::from_bytes(sig)) else {
        return false;
    };
    if pk.verify_simple(SIGNING_CONTEXT, msg, &sig).is_ok() {
        return true;
    }
    let mut wrapped = Vec::with_capacity(msg.len() + 15);
    wrapped.extend_from_slice(b"<Bytes>");
    wrapped.extend_from_slice(msg);
    wrapped.extend_from_slice(b"</Bytes>");
    pk.verify_simple(SIGNING_CONTEXT, &wrapped, &sig).is_ok()
}

/// URL-safe base64 without `=` padding (the chain commit encoding of signatures).
pub fn b64url_nopad_encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes URL-safe base64 with or without `=` padding.
pub fn b64url_nopad_decode(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text.trim_end_matches('='))
}

/// Reads the coldkey's SS58 address from `<wallet_path>/<coldkey>/coldkeypub.txt` (JSON with `ss58Address`
/// or `publicKey`, or a bare address).
pub fn coldkey_ss58(wallet_path: &Path, coldkey: &str) -> Result<String, KeyError> {
    let path = expand_home(wallet_path)
        .join(coldkey)
        .join("coldkeypub.txt");
    let data = std::fs::read(&path).map_err(|source| KeyError::Io {
        path: path.clone(),
        source,
    })?;
    let text = String::from_utf8_lossy(&data);
    let text = text.trim();
    if text.starts_with('{') {
        let json = keyfile::parse_json(text.as_bytes(), &path)?;
        if let Some(a) = &json.ss58_address {
            ss58_decode(a)
                .map_err(|_| malformed(&path, "ss58Address is not a valid format-42 address"))?;
            return Ok(a.clone());
        }
        if let Some(h) = json.public_key.as_ref().or(json.account_id.as_ref()) {
            let pk = keyfile::hex_n::<32>(h)
                .ok_or_else(|| malformed(&path, "publicKey is not 32 bytes of hex"))?;
            return Ok(ss58_encode(&pk));
        }
        return Err(malformed(&path, "no ss58Address or publicKey"));
    }
    ss58_decode(text).map_err(|_| malformed(&path, "not a coldkeypub JSON nor an ss58 address"))?;
    Ok(text.to_owned())
}
