//! Secret tokens kept in files beside the data they guard (`agent.token`, `admin.token`, ...).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, bail};

/// A new random token: 32 bytes as hex.
pub fn generate() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// The visible start of every API token, so a leaked one is recognisable (secret scanners, logs).
pub const API_TOKEN_PREFIX: &str = "snapq_";

/// A new API token: `snapq_` and 32 random bytes as hex.
pub fn generate_api_token() -> String {
    format!("{API_TOKEN_PREFIX}{}", generate())
}

/// What listings show of a token: its first 12 characters (`snapq_1a2b3c`).
pub fn api_token_prefix(token: &str) -> String {
    token.chars().take(12).collect()
}

/// The token in `path`, else a new one from `make` written there with mode 0600.
pub fn load_or_create_with(path: &Path, make: fn() -> String) -> anyhow::Result<String> {
    create_or_read(path, make)
}

/// The token to use: `explicit` if given, else the one in `path`, else a new one written to `path`
/// with mode 0600 so only its owner can read it.
pub fn load_or_create(explicit: Option<&str>, path: &Path) -> anyhow::Result<String> {
    if let Some(token) = explicit {
        if token.trim().is_empty() {
            bail!("the token is empty; pass a non-empty token or omit it to generate one");
        }
        return Ok(token.trim().to_owned());
    }
    create_or_read(path, generate)
}

fn create_or_read(path: &Path, make: fn() -> String) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(token) if !token.trim().is_empty() => return Ok(token.trim().to_owned()),
        Ok(_) => bail!(
            "{} is empty; delete it to have a new token made",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let token = make();
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(token.as_bytes())?;
    file.sync_all()?;
    Ok(token)
}

/// Replaces `path` with `text`, readable by its owner only (temporary file, then rename).
pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Reads a token file written by [`load_or_create`].
pub fn read(path: &Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    Ok(token.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_new_token_is_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.token");
        let first = load_or_create(None, &path).unwrap();
        assert_eq!(first.len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create(None, &path).unwrap(), first);
        assert_eq!(load_or_create(Some("given"), &path).unwrap(), "given");
        assert!(load_or_create(Some("  "), &path).is_err());
    }
}
