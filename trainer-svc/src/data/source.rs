//! Document sources: local text files (one document per non-empty line), JSONL files (one JSON
//! object per line, the configured text column), parquet files (the configured string column)
//! and the embedded default corpus.

use std::fs::File;
use std::io::{BufRead, BufReader, Cursor};
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::record::reader::RowIter;

use super::DataError;
use super::hub_source::{HubDataset, HubShards};

/// The embedded default corpus (see `assets/make_assets.py`).
pub const EMBEDDED_MATH_JSONL: &str = include_str!("../../assets/math.jsonl");
pub const EMBEDDED_PROSE_TXT: &str = include_str!("../../assets/prose.txt");

/// Where a source's documents come from and how to read them.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceKind {
    /// One document per non-empty line.
    Text(PathBuf),
    /// One JSON object per line; the document is the string in `text_column`.
    Jsonl { path: PathBuf, text_column: String },
    /// A parquet file; one document per row, the string column `text_column`.
    Parquet { path: PathBuf, text_column: String },
    /// A corpus compiled into the binary (`name` is `math.jsonl` or `prose.txt`).
    Embedded(&'static str),
    /// A Hub dataset streamed shard by shard.
    Hub(HubDataset),
}

/// One weighted source of the training mix.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceSpec {
    /// Display name (used in errors, logs and the saved data position).
    pub name: String,
    pub kind: SourceKind,
    pub weight: f64,
}

impl SourceSpec {
    /// Picks the reader from the file extension: `.jsonl`/`.json` → JSONL, `.parquet` →
    /// parquet, anything else → text.
    pub fn local(name: &str, path: &Path, text_column: &str, weight: f64) -> Self {
        // `x.json.gz` is read through gzip as `x.json`.
        let plain = path.to_string_lossy();
        let plain = Path::new(plain.strip_suffix(".gz").unwrap_or(&plain));
        let ext = plain.extension().and_then(|e| e.to_str()).unwrap_or("");
        let kind = match ext {
            "jsonl" | "json" => SourceKind::Jsonl {
                path: path.to_path_buf(),
                text_column: text_column.to_string(),
            },
            "parquet" => SourceKind::Parquet {
                path: path.to_path_buf(),
                text_column: text_column.to_string(),
            },
            _ => SourceKind::Text(path.to_path_buf()),
        };
        SourceSpec {
            name: name.to_string(),
            kind,
            weight,
        }
    }

    /// The embedded default mix: synthetic math word problems and plain prose, half and half.
    pub fn embedded_default() -> Vec<SourceSpec> {
        vec![
            SourceSpec {
                name: "embedded:math.jsonl".into(),
                kind: SourceKind::Embedded("math.jsonl"),
                weight: 0.5,
            },
            SourceSpec {
                name: "embedded:prose.txt".into(),
                kind: SourceKind::Embedded("prose.txt"),
                weight: 0.5,
            },
        ]
    }

    /// A Hub dataset source; its display name is `owner/name[:config]`.
    pub fn hub(ds: HubDataset, weight: f64) -> Self {
        let name = match &ds.config {
            Some(c) => format!("{}:{c}", ds.repo),
            None => ds.repo.clone(),
        };
        SourceSpec {
            name,
            kind: SourceKind::Hub(ds),
            weight,
        }
    }

    /// Checks that a local source can be opened (used by config validation; Hub sources are
    /// reached when training starts).
    pub fn check(&self) -> Result<(), DataError> {
        if matches!(self.kind, SourceKind::Hub(_)) {
            return Ok(());
        }
        self.open().map(|_| ())
    }

    /// Opens a Hub source at a saved commit (resume), others as [`Self::open`].
    pub(crate) fn open_at(&self, commit: Option<&str>) -> Result<DocReader, DataError> {
        match &self.kind {
            SourceKind::Hub(ds) => Ok(DocReader {
                name: self.name.clone(),
                inner: Inner::Hub(Box::new(HubShards::open(ds, commit)?)),
                line_no: 0,
                index: 0,
            }),
            _ => self.open(),
        }
    }

    pub(crate) fn open(&self) -> Result<DocReader, DataError> {
        let lines = |reader: Box<dyn BufRead + Send>, json_col: Option<String>| Inner::Lines {
            reader,
            json_col,
        };
        let inner = match &self.kind {
            SourceKind::Text(p) => lines(open_lines(p)?, None),
            SourceKind::Jsonl { path, text_column } => {
                lines(open_lines(path)?, Some(text_column.clone()))
            }
            SourceKind::Hub(_) => return self.open_at(None),
            SourceKind::Parquet { path, text_column } => {
                Inner::Parquet(Box::new(open_parquet(path, text_column)?))
            }
            SourceKind::Embedded("math.jsonl") => lines(
                Box::new(Cursor::new(EMBEDDED_MATH_JSONL)),
                Some("text".into()),
            ),
            SourceKind::Embedded(_) => lines(Box::new(Cursor::new(EMBEDDED_PROSE_TXT)), None),
        };
        Ok(DocReader {
            name: self.name.clone(),
            inner,
            line_no: 0,
            index: 0,
        })
    }
}

/// A buffered line reader, through gzip when the name ends in `.gz`.
fn open_lines(p: &Path) -> Result<Box<dyn BufRead + Send>, DataError> {
    let f = open_file(p)?;
    if p.to_string_lossy().ends_with(".gz") {
        Ok(Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(
            f,
        ))))
    } else {
        Ok(Box::new(BufReader::new(f)))
    }
}

fn open_file(p: &Path) -> Result<File, DataError> {
    File::open(p).map_err(|e| DataError::Open {
        path: p.display().to_string(),
        reason: e.to_string(),
    })
}

/// Rows of one string column of a parquet file, in file order.
fn open_parquet(path: &Path, column: &str) -> Result<RowIter<'static>, DataError> {
    let bad = |reason: String| DataError::Open {
        path: path.display().to_string(),
        reason,
    };
    let file = open_file(path)?;
    let reader =
        SerializedFileReader::new(file).map_err(|e| bad(format!("not a parquet file: {e}")))?;
    let root = reader.metadata().file_metadata().schema().clone();
    let field = root
        .get_fields()
        .iter()
        .find(|f| f.name() == column)
        .cloned()
        .ok_or_else(|| bad(format!("no column `{column}`")))?;
    let proj = parquet::schema::types::Type::group_type_builder(root.name())
        .with_fields(vec![field])
        .build()
        .map_err(|e| bad(format!("project column `{column}`: {e}")))?;
    RowIter::from_file_into(Box::new(reader))
        .project(Some(proj))
        .map_err(|e| bad(format!("read column `{column}`: {e}")))
}

enum Inner {
    Lines {
        reader: Box<dyn BufRead + Send>,
        json_col: Option<String>,
    },
    Parquet(Box<RowIter<'static>>),
    Hub(Box<HubShards>),
}

/// Streams the documents of one source in file order; `index` counts documents returned.
pub(crate) struct DocReader {
    name: String,
    inner: Inner,
    /// Lines (or rows) read so far.
    line_no: u64,
    /// Index of the next document this reader returns.
    pub(crate) index: u64,
}

impl DocReader {
    /// A reader with no documents.
    pub(crate) fn empty() -> Self {
        DocReader {
            name: String::new(),
            inner: Inner::Lines {
                reader: Box::new(Cursor::new("")),
                json_col: None,
            },
            line_no: 0,
            index: 0,
        }
    }

    /// For a Hub source: (commit, shard index, documents read in the shard).
    pub(crate) fn shard_position(&self) -> Option<(String, u64, u64)> {
        match &self.inner {
            Inner::Hub(h) => Some((h.commit.clone(), h.shard, h.shard_doc)),
            _ => None,
        }
    }

    /// For a Hub source: continue at document `doc` of shard `shard`; `false` for others.
    pub(crate) fn seek_shard(&mut self, shard: u64, doc: u64, index: u64) -> bool {
        match &mut self.inner {
            Inner::Hub(h) => {
                h.seek(shard, doc);
                self.index = index;
                true
            }
            _ => false,
        }
    }

    /// The next document, or `None` at the end of the source.
    pub(crate) fn next_doc(&mut self) -> Result<Option<String>, DataError> {
        let (reader, json_col) = match &mut self.inner {
            Inner::Hub(h) => {
                let d = h.next_doc()?;
                if d.is_some() {
                    self.index += 1;
                }
                return Ok(d);
            }
            Inner::Lines { reader, json_col } => (reader, json_col),
            Inner::Parquet(rows) => loop {
                let Some(row) = rows.next() else {
                    return Ok(None);
                };
                self.line_no += 1;
                let row = row.map_err(|e| DataError::Read {
                    source_name: self.name.clone(),
                    line: self.line_no,
                    reason: e.to_string(),
                })?;
                let doc = match row.get_column_iter().next().map(|(_, f)| f) {
                    Some(Field::Str(s)) => s.clone(),
                    Some(Field::Null) | None => continue,
                    Some(other) => other.to_string(),
                };
                if doc.trim().is_empty() {
                    continue;
                }
                self.index += 1;
                return Ok(Some(doc));
            },
        };
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader.read_line(&mut line).map_err(|e| DataError::Read {
                source_name: self.name.clone(),
                line: self.line_no + 1,
                reason: e.to_string(),
            })?;
            if n == 0 {
                return Ok(None);
            }
            self.line_no += 1;
            let trimmed = line.trim_end_matches(['\n', '\r']);
            if trimmed.trim().is_empty() {
                continue;
            }
            let doc = match json_col {
                None => trimmed.to_string(),
                Some(col) => {
                    let v: serde_json::Value =
                        serde_json::from_str(trimmed).map_err(|e| DataError::Read {
                            source_name: self.name.clone(),
                            line: self.line_no,
                            reason: format!("invalid JSON: {e}"),
                        })?;
                    match v.get(col.as_str()) {
                        Some(serde_json::Value::String(s)) => s.clone(),
                        Some(other) => other.to_string(),
                        None => {
                            return Err(DataError::Read {
                                source_name: self.name.clone(),
                                line: self.line_no,
                                reason: format!("no column `{col}`"),
                            });
                        }
                    }
                }
            };
            self.index += 1;
            return Ok(Some(doc));
        }
    }
}
