//! Downloads through `/<repo>/resolve/<rev>/<file>`: HEAD for the commit/etag/size (not following
//! the CDN redirect, whose target lacks those headers), GET pinned to the resolved commit with
//! `Range` to resume, streamed to `<dest>.part` and renamed once the size (and the sha256 when the
//! etag is one) matches. Redirects are followed by the safe policy of [`HubClient`].

use crate::client::{encode, header_str, map_reqwest, read_limited, status_error};
use crate::{
    FileMeta, HubClient, HubError, MAX_RANGE_BYTES, MAX_REDIRECTS, RepoId, RepoType, escape,
};
use bytes::Bytes;
use reqwest::{Response, StatusCode, header};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

/// A streaming file body. Each [`FileBody::chunk`] waits at most the read timeout.
pub struct FileBody {
    resp: Option<Response>,
    url: String,
    remaining: u64,
}

impl FileBody {
    /// The next bytes, `None` at the end. Errors if the body runs past the announced size or ends short.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, HubError> {
        let Some(resp) = self.resp.as_mut() else {
            return Ok(None);
        };
        match resp.chunk().await.map_err(|e| map_reqwest(&self.url, e))? {
            Some(b) => {
                if b.len() as u64 > self.remaining {
                    return Err(HubError::Protocol(format!(
                        "{}: body longer than the announced size",
                        escape(&self.url)
                    )));
                }
                self.remaining -= b.len() as u64;
                Ok(Some(b))
            }
            None if self.remaining > 0 => Err(HubError::Connection {
                url: escape(&self.url),
                msg: format!("body ended {} bytes short", self.remaining),
            }),
            None => {
                self.resp = None;
                Ok(None)
            }
        }
    }
    /// Bytes still expected.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }
}

fn strip_etag(s: &str) -> String {
    s.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl HubClient {
    fn resolve_url(&self, repo: &RepoId, kind: RepoType, revision: &str, file: &str) -> String {
        format!(
            "{}/{}{}/resolve/{}/{}",
            self.cfg.endpoint,
            kind.url_prefix(),
            repo,
            encode(revision, false),
            encode(file, true)
        )
    }

    /// `HEAD .../resolve/<rev>/<file>`: the commit `rev` resolves to, the etag, the size.
    pub async fn head_file(
        &self,
        repo: &RepoId,
        kind: RepoType,
        revision: &str,
        file: &str,
    ) -> Result<FileMeta, HubError> {
        let mut url = self.resolve_url(repo, kind, revision, file);
        for _ in 0..=MAX_REDIRECTS {
            let resp = self
                .send(&url, || {
                    Ok(self
                        .plain
                        .head(&url)
                        .header(header::ACCEPT_ENCODING, "identity"))
                })
                .await?;
            let has_commit = resp.headers().contains_key("x-repo-commit");
            if resp.status().is_redirection() && !has_commit {
                // A relative redirect (renamed repo) stays on the Hub; anything else is refused.
                let loc = header_str(&resp, "location").unwrap_or_default();
                let next = url::Url::parse(&url)
                    .and_then(|u| u.join(&loc))
                    .map(|u| u.to_string())
                    .unwrap_or_default();
                if !self.same_origin(&next) {
                    return Err(HubError::Protocol(format!(
                        "{}: HEAD redirected off the Hub to {:?}",
                        escape(&url),
                        escape(&loc)
                    )));
                }
                url = next;
                continue;
            }
            return meta_from(&url, &resp);
        }
        Err(HubError::Protocol(format!(
            "{}: more than {MAX_REDIRECTS} redirects",
            escape(&url)
        )))
    }

    /// `GET .../resolve/<commit>/<file>` from byte `start` (pinned to the commit the HEAD resolved).
    pub async fn open_file(
        &self,
        repo: &RepoId,
        kind: RepoType,
        revision: &str,
        file: &str,
        start: u64,
    ) -> Result<(FileMeta, FileBody), HubError> {
        let meta = self.head_file(repo, kind, revision, file).await?;
        let body = self.open_at(repo, kind, &meta, file, start).await?;
        Ok((meta, body))
    }

    async fn open_at(
        &self,
        repo: &RepoId,
        kind: RepoType,
        meta: &FileMeta,
        file: &str,
        start: u64,
    ) -> Result<FileBody, HubError> {
        if start > meta.size {
            return Err(HubError::Config(format!(
                "start {start} past the end of {} ({} bytes)",
                escape(file),
                meta.size
            )));
        }
        let url = self.resolve_url(repo, kind, &meta.commit, file);
        if start == meta.size {
            return Ok(FileBody {
                resp: None,
                url,
                remaining: 0,
            });
        }
        let resp = self
            .send(&url, || {
                let rb = self
                    .http
                    .get(&url)
                    .header(header::ACCEPT_ENCODING, "identity");
                Ok(if start > 0 {
                    rb.header(header::RANGE, format!("bytes={start}-"))
                } else {
                    rb
                })
            })
            .await?;
        let ok = match resp.status() {
            StatusCode::PARTIAL_CONTENT => true,
            StatusCode::OK => start == 0,
            _ => false,
        };
        if !ok {
            return Err(HubError::Protocol(format!(
                "{}: status {} for a read from byte {start}",
                escape(&url),
                resp.status().as_u16()
            )));
        }
        Ok(FileBody {
            resp: Some(resp),
            url,
            remaining: meta.size - start,
        })
    }

    /// Downloads `file` at `revision` to `dest` (via `dest.part`, resumed with `Range` after a cut
    /// connection), refusing files over `max_bytes`. Verifies the size, and the sha256 for LFS files.
    pub async fn download_to(
        &self,
        repo: &RepoId,
        kind: RepoType,
        revision: &str,
        file: &str,
        dest: &Path,
        max_bytes: u64,
    ) -> Result<FileMeta, HubError> {
        let meta = self.head_file(repo, kind, revision, file).await?;
        if meta.size > max_bytes {
            return Err(HubError::TooLarge {
                what: format!("{repo}/{}", escape(file)),
                size: meta.size,
                limit: max_bytes,
            });
        }
        let part = part_path(dest);
        let mut have = tokio::fs::metadata(&part)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        if have > meta.size {
            have = 0;
        }
        let mut hasher = if is_sha256(&meta.etag) {
            Some(hash_prefix(&part, have).await?)
        } else {
            None
        };
        let out = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&part)
            .await
            .map_err(|e| HubError::io(&part, e))?;
        out.set_len(have)
            .await
            .map_err(|e| HubError::io(&part, e))?;
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, out);
        tokio::io::AsyncSeekExt::seek(&mut out, std::io::SeekFrom::Start(have))
            .await
            .map_err(|e| HubError::io(&part, e))?;
        let mut resumes = 0u32;
        while have < meta.size {
            match self
                .copy_from(
                    repo,
                    kind,
                    &meta,
                    file,
                    have,
                    &mut out,
                    &part,
                    hasher.as_mut(),
                )
                .await
            {
                Ok(n) => have += n,
                Err((n, e)) => {
                    have += n;
                    let retry =
                        matches!(e, HubError::Connection { .. }) && resumes < self.cfg.max_retries;
                    if !retry {
                        let _ = out.flush().await;
                        return Err(e);
                    }
                    resumes += 1;
                    tracing::debug!(file = %escape(file), have, error = %e, "Hub download cut; resuming with Range");
                }
            }
        }
        out.flush().await.map_err(|e| HubError::io(&part, e))?;
        out.get_ref()
            .sync_all()
            .await
            .map_err(|e| HubError::io(&part, e))?;
        drop(out);
        if let Some(h) = hasher {
            let got = hex::encode(h.finalize());
            if got != meta.etag.to_ascii_lowercase() {
                let _ = tokio::fs::remove_file(&part).await;
                return Err(HubError::Protocol(format!(
                    "{}: sha256 {got} differs from the Hub's {}",
                    escape(file),
                    escape(&meta.etag)
                )));
            }
        }
        tokio::fs::rename(&part, dest)
            .await
            .map_err(|e| HubError::io(dest, e))?;
        Ok(meta)
    }

    /// Copies one GET from `start` into `out`; on failure returns how many bytes were written.
    #[allow(clippy::too_many_arguments)]
    async fn copy_from(
        &self,
        repo: &RepoId,
        kind: RepoType,
        meta: &FileMeta,
        file: &str,
        start: u64,
        out: &mut tokio::io::BufWriter<tokio::fs::File>,
        part: &Path,
        mut hasher: Option<&mut Sha256>,
    ) -> Result<u64, (u64, HubError)> {
        let mut body = self
            .open_at(repo, kind, meta, file, start)
            .await
            .map_err(|e| (0, e))?;
        let mut n = 0u64;
        loop {
            match body.chunk().await {
                Ok(Some(b)) => {
                    out.write_all(&b)
                        .await
                        .map_err(|e| (n, HubError::io(part, e)))?;
                    if let Some(h) = hasher.as_deref_mut() {
                        h.update(&b);
                    }
                    n += b.len() as u64;
                }
                Ok(None) => return Ok(n),
                Err(e) => return Err((n, e)),
            }
        }
    }

    /// `len` bytes from `start` (a `Range` read, at most [`MAX_RANGE_BYTES`]).
    pub async fn get_range(
        &self,
        repo: &RepoId,
        kind: RepoType,
        revision: &str,
        file: &str,
        start: u64,
        len: u64,
    ) -> Result<Vec<u8>, HubError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        if len > MAX_RANGE_BYTES {
            return Err(HubError::TooLarge {
                what: format!("range of {}", escape(file)),
                size: len,
                limit: MAX_RANGE_BYTES,
            });
        }
        let url = self.resolve_url(repo, kind, revision, file);
        let end = start
            .checked_add(len - 1)
            .ok_or_else(|| HubError::Config("range overflows".into()))?;
        let resp = self
            .send_raw(&url, || {
                Ok(self
                    .http
                    .get(&url)
                    .header(header::ACCEPT_ENCODING, "identity")
                    .header(header::RANGE, format!("bytes={start}-{end}")))
            })
            .await?;
        if resp.status() != StatusCode::PARTIAL_CONTENT {
            if resp.status().is_success() {
                return Err(HubError::Protocol(format!(
                    "{}: status {} for a Range read",
                    escape(&url),
                    resp.status().as_u16()
                )));
            }
            return Err(status_error(&url, resp).await);
        }
        read_limited(&url, resp, len as usize).await
    }
}

fn meta_from(url: &str, resp: &Response) -> Result<FileMeta, HubError> {
    let commit = header_str(resp, "x-repo-commit").unwrap_or_default();
    if !crate::is_commit_oid(&commit) {
        return Err(HubError::Protocol(format!(
            "{}: X-Repo-Commit {:?} is not a 40-hex commit",
            escape(url),
            escape(&commit)
        )));
    }
    let etag = header_str(resp, "x-linked-etag")
        .or_else(|| header_str(resp, "etag"))
        .map(|e| strip_etag(&e))
        .unwrap_or_default();
    let size = header_str(resp, "x-linked-size")
        .or_else(|| header_str(resp, "content-length"))
        .and_then(|s| s.trim().parse::<u64>().ok())
        .ok_or_else(|| {
            HubError::Protocol(format!("{}: no file size in the HEAD reply", escape(url)))
        })?;
    Ok(FileMeta { commit, etag, size })
}

fn part_path(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(".part");
    PathBuf::from(s)
}

/// The sha256 state after the first `len` bytes of `path` (the part already downloaded).
async fn hash_prefix(path: &Path, len: u64) -> Result<Sha256, HubError> {
    if len == 0 {
        return Ok(Sha256::new());
    }
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let f = std::fs::File::open(&path).map_err(|e| HubError::io(&path, e))?;
        let mut r = f.take(len);
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = r.read(&mut buf).map_err(|e| HubError::io(&path, e))?;
            if n == 0 {
                return Ok(h);
            }
            h.update(&buf[..n]);
        }
    })
    .await
    .map_err(|e| HubError::Config(format!("hashing task: {e}")))?
}
