//! The data pipeline: interleave weights, held-out split, padding/labels, resume position.

use std::io::Write;

use trainer_svc::data::{
    IGNORE_INDEX, SourceSpec, TextTokenizer, TrainStream, held_out_docs, is_held_out, make_batch,
};

fn write_sources(dir: &std::path::Path, n: usize) -> Vec<SourceSpec> {
    let a = dir.join("a.jsonl");
    let mut f = std::fs::File::create(&a).unwrap();
    for i in 0..n {
        writeln!(
            f,
            "{}",
            serde_json::json!({"text": format!("alpha document number {i}"), "id": i})
        )
        .unwrap();
    }
    let b = dir.join("b.txt");
    let mut f = std::fs::File::create(&b).unwrap();
    for i in 0..n {
        writeln!(f, "beta line {i}").unwrap();
        writeln!(f).unwrap(); // blank lines are not documents
    }
    vec![
        SourceSpec::local("a", &a, "text", 0.8),
        SourceSpec::local("b", &b, "text", 0.2),
    ]
}

#[test]
fn interleave_follows_the_weights_and_is_seeded() {
    let dir = tempfile::tempdir().unwrap();
    let specs = write_sources(dir.path(), 5000);
    let mut s = TrainStream::new(&specs, 0.1).unwrap();
    let mut from_a = 0;
    let mut first = Vec::new();
    for i in 0..4000 {
        let (src, doc) = s.next_doc().unwrap();
        if src == 0 {
            from_a += 1;
            assert!(doc.starts_with("alpha"));
        } else {
            assert!(doc.starts_with("beta"));
        }
        if i < 50 {
            first.push(doc);
        }
    }
    let share = from_a as f64 / 4000.0;
    assert!(
        (share - 0.8).abs() < 0.03,
        "share of source a = {share}, want ~0.8"
    );
    // Same seed, same order.
    let mut again = TrainStream::new(&specs, 0.1).unwrap();
    let again: Vec<String> = (0..50).map(|_| again.next_doc().unwrap().1).collect();
    assert_eq!(first, again);
}

#[test]
fn held_out_documents_never_reach_the_training_stream() {
    let dir = tempfile::tempdir().unwrap();
    let specs = write_sources(dir.path(), 1000);
    let eval = held_out_docs(&specs, 0.1, 10_000).unwrap();
    // About 10% of the 2000 documents.
    assert!(
        (120..=280).contains(&eval.len()),
        "{} held-out docs",
        eval.len()
    );
    assert!(eval.iter().all(|d| is_held_out(d, 0.1)));
    let mut s = TrainStream::new(&specs, 0.1).unwrap();
    let mut seen = std::collections::HashSet::new();
    // More than one pass over both sources (epochs wrap).
    for _ in 0..5000 {
        let (_, d) = s.next_doc().unwrap();
        assert!(!is_held_out(&d, 0.1));
        seen.insert(d);
    }
    for d in &eval {
        assert!(!seen.contains(d), "held-out doc {d:?} was trained on");
    }
    assert!(
        s.position().sources.iter().all(|p| p.epoch >= 1),
        "{:?}",
        s.position()
    );
}

#[test]
fn batches_start_with_bos_pad_right_and_mask_padding() {
    let tok = TextTokenizer::embedded().unwrap();
    let bos = i64::from(tok.bos_id().unwrap());
    let pad = i64::from(tok.pad_id());
    let docs = vec!["Question: Ada has 3 apples.".to_string(), "x ".repeat(200)];
    let b = make_batch(&tok, &docs, 24).unwrap();
    assert_eq!((b.rows, b.seq_len), (2, 24));
    assert_eq!(b.input_ids.len(), 48);
    let (r0, r1) = (&b.input_ids[..24], &b.input_ids[24..]);
    assert_eq!(r0[0], bos);
    assert_eq!(r1[0], bos);
    // Short row: padded at the end, padding masked in the labels, real tokens kept.
    let n0 = tok.encode(&docs[0], 24).unwrap().len();
    assert!(n0 < 24);
    for (i, (id, label)) in r0.iter().zip(&b.labels[..24]).enumerate() {
        if i < n0 {
            assert_eq!(label, id);
        } else {
            assert_eq!(*id, pad);
            assert_eq!(*label, IGNORE_INDEX);
        }
    }
    // Long row: truncated to exactly 24 labelled tokens.
    assert!(b.labels[24..].iter().all(|l| *l != IGNORE_INDEX));
    assert_eq!(b.real_tokens, n0 + 24);
}

#[test]
fn resumed_stream_continues_exactly_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let specs = write_sources(dir.path(), 300);
    let mut full = TrainStream::new(&specs, 0.1).unwrap();
    let all: Vec<String> = (0..900).map(|_| full.next_doc().unwrap().1).collect();

    let mut first = TrainStream::new(&specs, 0.1).unwrap();
    for _ in 0..400 {
        first.next_doc().unwrap();
    }
    let pos = first.position();
    // The position survives a JSON round trip (it is stored in checkpoints).
    let pos: trainer_svc::data::DataPosition =
        serde_json::from_str(&serde_json::to_string(&pos).unwrap()).unwrap();
    assert_eq!(pos.sources.iter().map(|p| p.consumed).sum::<u64>(), 400);
    let mut resumed = TrainStream::resume(&specs, 0.1, &pos).unwrap();
    let rest: Vec<String> = (0..500).map(|_| resumed.next_doc().unwrap().1).collect();
    assert_eq!(rest, all[400..]);

    // A position for other sources is refused with a clear message.
    let other = vec![specs[1].clone(), specs[0].clone()];
    let err = TrainStream::resume(&other, 0.1, &pos)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("saved source a"), "{err}");
}

fn write_parquet(path: &std::path::Path, n: usize) {
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use std::sync::Arc;
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(
            "message schema { REQUIRED INT64 id; REQUIRED BYTE_ARRAY text (UTF8); }",
        )
        .unwrap(),
    );
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let mut w =
        SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    let ids: Vec<i64> = (0..n as i64).collect();
    // Two row groups.
    for chunk in ids.chunks(n / 2) {
        let mut rg = w.next_row_group().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<Int64Type>()
            .write_batch(chunk, None, None)
            .unwrap();
        col.close().unwrap();
        let texts: Vec<ByteArray> = chunk
            .iter()
            .map(|i| ByteArray::from(format!("parquet row {i}").as_str()))
            .collect();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>()
            .write_batch(&texts, None, None)
            .unwrap();
        col.close().unwrap();
        rg.close().unwrap();
    }
    w.close().unwrap();
}

#[test]
fn parquet_sources_stream_their_text_column_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("part-0.parquet");
    write_parquet(&p, 400);
    let specs = vec![SourceSpec::local("pq", &p, "text", 1.0)];
    let mut s = TrainStream::new(&specs, 0.1).unwrap();
    let docs: Vec<String> = (0..500).map(|_| s.next_doc().unwrap().1).collect();
    // File order, held-out rows skipped, wraps into a second epoch.
    let expected: Vec<String> = (0..400)
        .map(|i| format!("parquet row {i}"))
        .filter(|d| !is_held_out(d, 0.1))
        .collect();
    assert_eq!(docs[..expected.len()], expected[..]);
    assert_eq!(s.position().sources[0].epoch, 1);
    // Resume in the middle of the second row group.
    let mut a = TrainStream::new(&specs, 0.1).unwrap();
    for _ in 0..250 {
        a.next_doc().unwrap();
    }
    let mut b = TrainStream::resume(&specs, 0.1, &a.position()).unwrap();
    assert_eq!(b.next_doc().unwrap().1, docs[250]);
    // A missing column is named.
    let bad = [SourceSpec::local("pq", &p, "content", 1.0)];
    let err = bad[0].check().unwrap_err().to_string();
    assert!(
        err.contains("no column `content`") && err.contains("part-0.parquet"),
        "{err}"
    );
}
