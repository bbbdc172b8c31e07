//! Wallet keyfiles, signing and addresses, against the devnet's real example wallet.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use miner_keys::{
    Hotkey, KeyError, NaclKdf, b64url_nopad_decode, b64url_nopad_encode, coldkey_ss58,
    nacl_encrypt, ss58_decode, ss58_encode, verify,
};

const EXAMPLE_HOTKEY_SS58: &str = "5FEc1TfRxmvKbMwQ8UpbszLa2AdXzTbcjK1ACXQBrhgGA9EF";
const EXAMPLE_COLDKEY_SS58: &str = "5GeiR6w3ad5JxpwdUS3ADPLexL5SDrbav3k8J5D7WfHTh1Q5";
const EXAMPLE_SEED: &str = "72c58328cd46b069e86db99a7ce3ebae0d9a390ae0c1ea3d36341814463498a2";
const EXAMPLE_PHRASE_WORD: &str = "satoshi";

/// `<workspace>/../shared/devnet/data/example_wallet` (CI clones the workspace with shared/ beside it).
fn example_wallet() -> PathBuf {
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/devnet/data/example_wallet");
    assert!(
        p.is_dir(),
        "example wallet missing at {} (shared/ must sit beside the workspace)",
        p.display()
    );
    p
}

fn example_keyfile_json() -> serde_json::Value {
    let text = std::fs::read(example_wallet().join("miners/hotkeys/miner_1")).unwrap();
    serde_json::from_slice(&text).unwrap()
}

/// Copies the example wallet into a temp dir with the given hotkey-file mode.
fn wallet_copy(mode: u32, keyfile: &[u8]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let hk = dir.path().join("miners/hotkeys");
    std::fs::create_dir_all(&hk).unwrap();
    std::fs::copy(
        example_wallet().join("miners/coldkeypub.txt"),
        dir.path().join("miners/coldkeypub.txt"),
    )
    .unwrap();
    let f = hk.join("miner_1");
    std::fs::write(&f, keyfile).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
    dir
}

#[test]
fn example_wallet_loads_with_its_published_address() {
    let key = Hotkey::load(&example_wallet(), "miners", "miner_1", None).unwrap();
    assert_eq!(key.ss58(), EXAMPLE_HOTKEY_SS58);
    assert_eq!(ss58_encode(&key.public()), EXAMPLE_HOTKEY_SS58);
    assert_eq!(ss58_decode(EXAMPLE_HOTKEY_SS58).unwrap(), key.public());
    assert_eq!(
        coldkey_ss58(&example_wallet(), "miners").unwrap(),
        EXAMPLE_COLDKEY_SS58
    );
}

#[test]
fn seed_phrase_and_private_key_each_give_the_same_key() {
    let full = example_keyfile_json();
    for field in ["secretSeed", "secretPhrase", "privateKey"] {
        let mut only = serde_json::Map::new();
        only.insert(field.to_owned(), full[field].clone());
        only.insert("ss58Address".to_owned(), full["ss58Address"].clone());
        let data = serde_json::to_vec(&only).unwrap();
        let key = Hotkey::from_keyfile_data(&data, Path::new("only-one-field"), None)
            .unwrap_or_else(|e| panic!("keyfile with only {field}: {e}"));
        assert_eq!(key.ss58(), EXAMPLE_HOTKEY_SS58, "from {field}");
    }
    let from_seed = Hotkey::from_seed_hex(&format!("0x{EXAMPLE_SEED}")).unwrap();
    assert_eq!(from_seed.ss58(), EXAMPLE_HOTKEY_SS58);
}

#[test]
fn mismatched_public_key_and_public_only_files_are_refused() {
    let mut full = example_keyfile_json();
    full["secretSeed"] = serde_json::Value::String(format!("0x{}", "11".repeat(32)));
    let err = Hotkey::from_keyfile_data(&serde_json::to_vec(&full).unwrap(), Path::new("kf"), None)
        .unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");

    let coldpub = std::fs::read(example_wallet().join("miners/coldkeypub.txt")).unwrap();
    let err = Hotkey::from_keyfile_data(&coldpub, Path::new("coldkeypub.txt"), None).unwrap_err();
    assert!(matches!(err, KeyError::NoSecret { .. }), "{err}");

    let err = Hotkey::load(Path::new("/nonexistent-wallet"), "c", "h", None).unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent-wallet/c/hotkeys/h"),
        "{err}"
    );
}

#[test]
fn signatures_verify_and_tampering_is_detected() {
    let key = Hotkey::load(&example_wallet(), "miners", "miner_1", None).unwrap();
    // The MinerCommit1 message: the 48 ASCII hex chars of the model hash.
    let msg = b"a1f3a4babc0e24a94158be35977d2dacaa767a35fc0ed159";
    let sig = key.sign(msg);
    assert!(verify(&key.public(), msg, &sig));
    assert!(!verify(
        &key.public(),
        b"a1f3a4babc0e24a94158be35977d2dacaa767a35fc0ed158",
        &sig
    ));
    let bob = Hotkey::from_uri("//Bob").unwrap();
    assert!(!verify(&bob.public(), msg, &sig));
    let mut bad = sig;
    bad[10] ^= 1;
    assert!(!verify(&key.public(), msg, &bad));
    // Randomized signatures.
    assert_ne!(key.sign(msg), sig);

    // Commit encoding: 86 chars of URL-safe base64 without padding; padded input decodes too.
    let text = b64url_nopad_encode(&sig);
    assert_eq!(text.len(), 86);
    assert!(!text.contains('=') && !text.contains('+') && !text.contains('/'));
    assert_eq!(b64url_nopad_decode(&text).unwrap(), sig);
    assert_eq!(b64url_nopad_decode(&format!("{text}==")).unwrap(), sig);

    // bittensor's verify accepts signatures over <Bytes>msg</Bytes>.
    let wrapped = key.sign(b"<Bytes>a1f3a4babc0e24a94158be35977d2dacaa767a35fc0ed159</Bytes>");
    assert!(verify(&key.public(), msg, &wrapped));
}

#[test]
fn dev_uris_match_the_devnet_table() {
    assert_eq!(
        Hotkey::from_uri("//Bob").unwrap().ss58(),
        "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"
    );
    assert_eq!(
        Hotkey::from_uri("//Charlie").unwrap().ss58(),
        "5FLSigC9HGRKVhB9FiEo4Y3koPsNmBmLJbpXg2mp1hXcS59Y"
    );
}

#[test]
fn group_readable_keyfile_warns_and_private_one_does_not() {
    let data = std::fs::read(example_wallet().join("miners/hotkeys/miner_1")).unwrap();
    let open = wallet_copy(0o640, &data);
    let key = Hotkey::load(open.path(), "miners", "miner_1", None).unwrap();
    assert_eq!(key.warnings().len(), 1);
    assert!(
        key.warnings()[0].contains("chmod 600"),
        "{:?}",
        key.warnings()
    );

    let private = wallet_copy(0o600, &data);
    let key = Hotkey::load(private.path(), "miners", "miner_1", None).unwrap();
    assert!(key.warnings().is_empty(), "{:?}", key.warnings());
}

#[test]
fn debug_and_display_never_show_the_secret() {
    let key = Hotkey::load(&example_wallet(), "miners", "miner_1", None).unwrap();
    for text in [format!("{key:?}"), format!("{key}"), format!("{key:#?}")] {
        assert!(text.contains(EXAMPLE_HOTKEY_SS58), "{text}");
        assert!(
            !text.contains(EXAMPLE_SEED) && !text.contains(&EXAMPLE_SEED[..16]),
            "{text}"
        );
        assert!(!text.contains(EXAMPLE_PHRASE_WORD), "{text}");
        assert!(!text.contains("1baf8d02eb6c3d51"), "{text}");
    }
    // Errors about a bad keyfile do not quote its contents.
    let mut full = example_keyfile_json();
    full["publicKey"] = serde_json::Value::String("0xzz".into());
    let err = Hotkey::from_keyfile_data(&serde_json::to_vec(&full).unwrap(), Path::new("kf"), None)
        .unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(
        !text.contains(EXAMPLE_SEED) && !text.contains(EXAMPLE_PHRASE_WORD),
        "{text}"
    );
    let err = Hotkey::from_keyfile_data(
        b"{\"secretSeed\": \"0x72c58328cd46b0",
        Path::new("kf"),
        None,
    )
    .unwrap_err();
    assert!(!format!("{err} {err:?}").contains("72c58328"), "{err:?}");
}

#[test]
fn nacl_encrypted_keyfile_round_trips_and_rejects_a_wrong_password() {
    let cheap = NaclKdf {
        mem_kib: 64,
        passes: 1,
    };
    let plain = std::fs::read(example_wallet().join("miners/hotkeys/miner_1")).unwrap();
    let enc = nacl_encrypt(&plain, b"correct horse", cheap).unwrap();
    assert!(enc.starts_with(b"$NACL"));
    let key =
        Hotkey::from_keyfile_data_with_kdf(&enc, Path::new("enc"), Some("correct horse"), cheap)
            .unwrap();
    assert_eq!(key.ss58(), EXAMPLE_HOTKEY_SS58);
    let err = Hotkey::from_keyfile_data_with_kdf(&enc, Path::new("enc"), Some("wrong"), cheap)
        .unwrap_err();
    assert!(matches!(err, KeyError::WrongPassword { .. }), "{err}");
    let err = Hotkey::from_keyfile_data_with_kdf(&enc, Path::new("enc"), None, cheap).unwrap_err();
    assert!(matches!(err, KeyError::PasswordRequired { .. }), "{err}");
    let err =
        Hotkey::from_keyfile_data(b"$ANSIBLE_VAULT;1.1;AES256\n00", Path::new("av"), Some("x"))
            .unwrap_err();
    assert!(
        matches!(err, KeyError::UnsupportedEncryption { .. }),
        "{err}"
    );
}

/// Known answer: `tests/data/miner_1.cheap.nacl` was written by libsodium itself (npm `libsodium-wrappers-sumo`
/// 0.7: `crypto_pwhash(32, pw, NACL_SALT, 3, 8 MiB, ALG_ARGON2I13)` + `crypto_secretbox_easy`, prefixed with
/// `$NACL` ‖ nonce, exactly btwallet's `encrypt_keyfile_data`) from the example wallet's hotkey keyfile.
/// btwallet's own cost (8 passes, 512 MiB) differs only in the two numbers; it takes ~56 s in a debug build,
/// so it is not run here (the same libsodium-written file with that cost decrypted in a manual run).
const KAT_PASSWORD: &str = "miner-keys test password";

#[test]
fn libsodium_encrypted_keyfile_decrypts() {
    let data =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/miner_1.cheap.nacl"))
            .unwrap();
    let kdf = NaclKdf {
        mem_kib: 8 * 1024,
        passes: 3,
    };
    let key = Hotkey::from_keyfile_data_with_kdf(&data, Path::new("kat"), Some(KAT_PASSWORD), kdf)
        .unwrap();
    assert_eq!(key.ss58(), EXAMPLE_HOTKEY_SS58);
}

#[test]
fn the_password_comes_from_a_private_file_or_a_systemd_credential() {
    use miner_keys::PasswordSource;
    let dir = tempfile::tempdir().unwrap();
    let keyfile = Path::new("/wallets/c/hotkeys/h");
    let file = dir.path().join("pw");
    std::fs::write(&file, "s3cret pass\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("wallet-password"), "from systemd").unwrap();

    let from_file = PasswordSource {
        file: Some(file.clone()),
        credential: Some("wallet-password".into()),
        credentials_dir: Some(creds.clone()),
        env: None,
    };
    assert_eq!(from_file.obtain(keyfile).unwrap().as_str(), "s3cret pass");
    let from_cred = PasswordSource {
        file: None,
        ..from_file.clone()
    };
    assert_eq!(from_cred.obtain(keyfile).unwrap().as_str(), "from systemd");
    // No source: the error says where a password can come from (stdin is not a terminal here).
    let none = PasswordSource {
        credentials_dir: Some(dir.path().join("absent")),
        ..from_cred.clone()
    };
    let err = none.obtain(keyfile).unwrap_err().to_string();
    assert!(err.contains("--wallet-password-file"), "{err}");
    // A password file others can read is refused, naming it; its content never shows.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = from_file.obtain(keyfile).unwrap_err().to_string();
    assert!(
        err.contains("readable by others") && err.contains("pw"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
    // A credential name cannot leave the credentials directory.
    let escape = PasswordSource {
        credential: Some("../pw".into()),
        ..from_cred
    };
    assert!(escape.credential_path().is_none());
}

#[test]
fn wallet_names_that_leave_the_wallet_directory_are_refused() {
    for bad in ["", ".", "..", "a/b", "../x", "a\\b", "a\0b", "a\nb"] {
        let err = Hotkey::load(Path::new("/nonexistent"), bad, "h", None).unwrap_err();
        assert!(
            matches!(
                err,
                KeyError::BadWalletName {
                    what: "coldkey",
                    ..
                }
            ),
            "{bad:?}: {err}"
        );
        let err = Hotkey::load(Path::new("/nonexistent"), "c", bad, None).unwrap_err();
        assert!(
            matches!(err, KeyError::BadWalletName { what: "hotkey", .. }),
            "{bad:?}: {err}"
        );
    }
    assert!(miner_keys::check_wallet_name("hotkey", "miner_1.v2").is_ok());
}
