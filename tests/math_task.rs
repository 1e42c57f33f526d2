//! The `math` task's text side on files: the shipped sample problems and the JSONL reader's
//! errors. (Answer matching and episode splitting are unit-tested in `data/math.rs`.)

use std::fs;
use std::path::{Path, PathBuf};

use mrt::data::math::{equivalent, last_boxed, read_jsonl, sample_problems, write_jsonl, SAMPLE_SIZE};

fn sample_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/samples/math.jsonl")
}

/// The committed sample is exactly what the generator writes; `MRT_WRITE_SAMPLE=1` rewrites it
/// after a change to the generator.
#[test]
fn the_sample_file_is_the_generators_output() {
    let expected = sample_problems(SAMPLE_SIZE, 0);
    if std::env::var_os("MRT_WRITE_SAMPLE").is_some() {
        write_jsonl(&expected, &sample_path()).unwrap();
    }
    let read = read_jsonl(&sample_path()).unwrap();
    assert_eq!(
        read, expected,
        "data/samples/math.jsonl is stale: rerun with MRT_WRITE_SAMPLE=1"
    );
    // Each reference answer reads back as itself through the model's answer format.
    for p in &read {
        let reply = format!("Some reasoning.\n\nSo the answer is \\boxed{{{}}}.", p.answer);
        assert!(equivalent(last_boxed(&reply).unwrap(), &p.answer), "{}", p.question);
    }
}

#[test]
fn bad_problem_files_name_the_line() {
    let dir = std::env::temp_dir().join(format!("mrt-math-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let cases = [
        (
            "{\"question\": \"1+1?\", \"answer\": 2}\n\n{\"question\": \"2+2?\"}\n",
            "line 3: fields [\"question\"] fit no known layout",
        ),
        ("{\"question\": \"1+1?\", \"answer\": 2}\nnot json\n", "line 2:"),
        (
            "{\"problem\": \"1+1?\", \"answer\": [2]}\n",
            "line 1: field `answer`: expected a string or a number",
        ),
        (
            "{\"question\": \" \", \"answer\": \"2\"}\n",
            "line 1: empty question or answer",
        ),
        ("\n\n", "no problems"),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let path = dir.join(format!("case{i}.jsonl"));
        fs::write(&path, text).unwrap();
        let err = read_jsonl(&path).unwrap_err().to_string();
        assert!(
            err.contains(expected) && err.contains(&format!("case{i}.jsonl")),
            "case {i}: {err}"
        );
    }
    // `problem` for `question`, numbers for answers, other fields ignored.
    let path = dir.join("ok.jsonl");
    fs::write(
        &path,
        "{\"problem\": \"Half of 3?\", \"answer\": 1.5, \"source\": \"x\"}\n",
    )
    .unwrap();
    let p = read_jsonl(&path).unwrap();
    assert_eq!((p[0].question.as_str(), p[0].answer.as_str()), ("Half of 3?", "1.5"));
    let err = read_jsonl(&dir.join("missing.jsonl")).unwrap_err().to_string();
    assert!(err.contains("missing.jsonl"), "{err}");
    let _ = fs::remove_dir_all(&dir);
}
