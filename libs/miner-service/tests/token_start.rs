//! Start-up of the control token: temporaries of a writer that died before linking the token
//! file are removed; a live writer's are kept; a token file others can read is refused.

use std::os::unix::fs::PermissionsExt;

use miner_service::{ControlToken, TokenError};

#[test]
fn stale_token_temporaries_are_removed_at_start_and_live_ones_kept() {
    let run = tempfile::tempdir().unwrap();
    let control = run.path().join("control");
    std::fs::create_dir_all(&control).unwrap();
    // pid 999999999 cannot exist (above any pid_max); our own pid is alive.
    let dead = control.join(".token.999999999.00000000deadbeef.tmp");
    let live = control.join(format!(
        ".token.{}.00000000cafef00d.tmp",
        std::process::id()
    ));
    std::fs::write(&dead, "half a token").unwrap();
    std::fs::write(&live, "being written").unwrap();
    let t = ControlToken::load_or_create(run.path()).unwrap();
    assert!(!dead.exists(), "a dead writer's temporary is removed");
    assert!(live.exists(), "a live writer's temporary is kept");
    assert_eq!(
        ControlToken::load_or_create(run.path()).unwrap().expose(),
        t.expose()
    );

    let token = ControlToken::path_in(run.path());
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = ControlToken::load_or_create(run.path()).unwrap_err();
    assert!(matches!(err, TokenError::TooOpen { .. }), "{err}");
    assert!(!err.to_string().contains(t.expose()), "{err}");
}
