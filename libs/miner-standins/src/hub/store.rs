//! The stand-in's repositories: commits as full file maps (small: paths and blob ids), revisions
//! resolved by branch, full oid or unique hex prefix, and content-addressed blobs on disk.

use sha1::Sha1;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Model or dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    pub fn url_prefix(self) -> &'static str {
        match self {
            RepoKind::Model => "",
            RepoKind::Dataset => "datasets/",
        }
    }
}

/// One file in a commit.
#[derive(Debug, Clone)]
pub struct Entry {
    pub size: u64,
    /// The sha256 of the content (the blob's name).
    pub sha256: String,
    pub lfs: bool,
    /// Git blob oid: of the content for regular files, of the pointer for LFS files.
    pub git_oid: String,
}

impl Entry {
    /// `content` is needed for a regular file's git oid (small files only).
    pub fn new(size: u64, sha256: String, lfs: bool, content: Option<&[u8]>) -> Self {
        let git_oid = if lfs {
            git_blob_oid(lfs_pointer(&sha256, size).as_bytes())
        } else {
            git_blob_oid(content.unwrap_or_default())
        };
        Entry {
            size,
            sha256,
            lfs,
            git_oid,
        }
    }
}

pub fn lfs_pointer(sha256: &str, size: u64) -> String {
    format!("version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n")
}

pub fn git_blob_oid(content: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(format!("blob {}\0", content.len()).as_bytes());
    h.update(content);
    hex::encode(h.finalize())
}

#[derive(Debug, Clone)]
pub struct Commit {
    pub oid: String,
    pub files: BTreeMap<String, Entry>,
}

#[derive(Debug)]
pub struct Repo {
    pub private: bool,
    /// Oldest first; `main` is the last.
    pub commits: Vec<Commit>,
}

#[derive(Default)]
pub struct Store {
    pub repos: HashMap<(RepoKind, String), Repo>,
    pub uploads: HashMap<String, Upload>,
    /// Upload ids are never reused.
    pub next_upload: u64,
    counter: u64,
}

/// Why a revision or commit failed.
#[derive(Debug)]
pub enum StoreError {
    RepoNotFound,
    RevisionNotFound,
    Invalid(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::RepoNotFound => f.write_str("repository not found"),
            StoreError::RevisionNotFound => f.write_str("revision not found"),
            StoreError::Invalid(m) => f.write_str(m),
        }
    }
}

impl Store {
    /// Creates a repo with the Hub's initial commit (a `.gitattributes`); false if it exists.
    pub fn create(&mut self, kind: RepoKind, repo: &str, private: bool) -> bool {
        if self.repos.contains_key(&(kind, repo.to_string())) {
            return false;
        }
        let attrs = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n*.pt filter=lfs diff=lfs merge=lfs -text\n";
        let sha = hex::encode(Sha256::digest(attrs));
        let mut files = BTreeMap::new();
        files.insert(
            ".gitattributes".to_string(),
            Entry::new(attrs.len() as u64, sha, false, Some(attrs)),
        );
        let oid = self.next_oid(repo, "initial commit");
        self.repos.insert(
            (kind, repo.to_string()),
            Repo {
                private,
                commits: vec![Commit { oid, files }],
            },
        );
        true
    }

    pub fn get(&self, kind: RepoKind, repo: &str) -> Option<&Repo> {
        self.repos.get(&(kind, repo.to_string()))
    }

    pub fn head(&self, kind: RepoKind, repo: &str) -> Option<String> {
        self.get(kind, repo)
            .and_then(|r| r.commits.last())
            .map(|c| c.oid.clone())
    }

    fn next_oid(&mut self, repo: &str, summary: &str) -> String {
        self.counter += 1;
        let mut h = Sha1::new();
        h.update(
            format!(
                "{repo}\0{summary}\0{}\0{:?}",
                self.counter,
                std::time::SystemTime::now()
            )
            .as_bytes(),
        );
        hex::encode(h.finalize())
    }

    /// Applies `ops` (path -> Some(entry) to add, None to delete) on `main`; returns the new oid.
    pub fn commit(
        &mut self,
        kind: RepoKind,
        repo: &str,
        summary: &str,
        ops: Vec<(String, Option<Entry>)>,
    ) -> Result<String, StoreError> {
        let oid = self.next_oid(repo, summary);
        let r = self
            .repos
            .get_mut(&(kind, repo.to_string()))
            .ok_or(StoreError::RepoNotFound)?;
        let mut files = r
            .commits
            .last()
            .map(|c| c.files.clone())
            .unwrap_or_default();
        for (path, op) in ops {
            match op {
                Some(e) => {
                    files.insert(path, e);
                }
                None => {
                    if files.remove(&path).is_none() {
                        return Err(StoreError::Invalid(format!(
                            "cannot delete missing file {path:?}"
                        )));
                    }
                }
            }
        }
        r.commits.push(Commit {
            oid: oid.clone(),
            files,
        });
        Ok(oid)
    }
}

impl Repo {
    /// `main`, a full oid, or a unique hex prefix of at least 7 characters.
    pub fn resolve(&self, rev: &str) -> Result<&Commit, StoreError> {
        if rev == "main" {
            return self.commits.last().ok_or(StoreError::RevisionNotFound);
        }
        let hexish =
            rev.len() >= 7 && rev.len() <= 40 && rev.bytes().all(|b| b.is_ascii_hexdigit());
        if !hexish {
            return Err(StoreError::RevisionNotFound);
        }
        let rev = rev.to_ascii_lowercase();
        let mut found = self.commits.iter().filter(|c| c.oid.starts_with(&rev));
        match (found.next(), found.next()) {
            (Some(c), None) => Ok(c),
            _ => Err(StoreError::RevisionNotFound),
        }
    }
}

pub fn blob_path(data: &Path, sha256: &str) -> PathBuf {
    data.join("blobs").join(sha256)
}

/// Stores small content as a blob; returns its sha256.
pub fn write_blob(data: &Path, bytes: &[u8]) -> std::io::Result<String> {
    let sha = hex::encode(Sha256::digest(bytes));
    let p = blob_path(data, &sha);
    if !p.exists() {
        let tmp = data.join("tmp").join(format!("{sha}.inline"));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &p)?;
    }
    Ok(sha)
}

/// An LFS object being uploaded (from the batch until its blob exists).
#[derive(Debug, Clone)]
pub struct Upload {
    pub sha256: String,
    pub size: u64,
    /// `Some(chunk_size)` for multipart.
    pub chunk: Option<u64>,
    /// ETags of received parts, index = part number - 1.
    pub part_etags: Vec<Option<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_resolve_by_branch_full_oid_and_unique_prefix() {
        let mut st = Store::default();
        assert!(st.create(RepoKind::Model, "a/b", false));
        assert!(!st.create(RepoKind::Model, "a/b", true), "exists");
        let e = Entry::new(1, "00".repeat(32), true, None);
        let oid = st
            .commit(RepoKind::Model, "a/b", "x", vec![("f".into(), Some(e))])
            .unwrap();
        let repo = st.get(RepoKind::Model, "a/b").unwrap();
        assert_eq!(repo.resolve("main").unwrap().oid, oid);
        assert_eq!(repo.resolve(&oid).unwrap().oid, oid);
        assert_eq!(repo.resolve(&oid[..7]).unwrap().oid, oid);
        assert_eq!(repo.resolve(&oid[..7].to_uppercase()).unwrap().oid, oid);
        assert!(repo.resolve(&oid[..6]).is_err(), "shorter than 7");
        assert!(repo.resolve("nothex1").is_err());
        assert!(repo.resolve("dev").is_err());
        let first = &repo.commits[0];
        assert!(
            first.files.contains_key(".gitattributes"),
            "initial commit like the Hub's"
        );
        assert!(
            !repo
                .resolve(&first.oid[..7])
                .unwrap()
                .files
                .contains_key("f"),
            "old revisions stay"
        );
    }

    #[test]
    fn deleting_a_missing_file_is_refused() {
        let mut st = Store::default();
        st.create(RepoKind::Dataset, "a/d", false);
        assert!(matches!(
            st.commit(RepoKind::Dataset, "a/d", "x", vec![("nope".into(), None)]),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            st.commit(RepoKind::Model, "a/d", "x", vec![]),
            Err(StoreError::RepoNotFound)
        ));
    }
}
