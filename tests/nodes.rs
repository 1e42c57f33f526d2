//! Data-parallel RL over processes (`train --nodes`, rl/nodes.rs): two `train` processes on
//! the loopback address train the parameters one device trains; a killed node makes the
//! other exit with an error naming it, the last checkpoint loads, and the run resumed on two
//! nodes ends where an uninterrupted one does; nodes started with different configurations
//! are refused before anything is written. The warm start is shared the same way.

#[path = "common/params.rs"]
mod params;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use burn::backend::{Autodiff, Flex};
use mrt::model::checkpoint;
use mrt::rl::config::{Algo, RunConfig};
use mrt::rl::nodes::NodeGroup;
use mrt::rl::pipeline::{run_pipeline, PipelineOptions};
use params::{params, relative_difference};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mrt-nodes-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The config patch every run here uses (tests/data_parallel.rs's small model and steps).
fn patch(steps: usize) -> serde_json::Value {
    serde_json::json!({
        "model": { "d_model": 64, "n_layers": 2, "d_ff": 128 },
        "warm_start": { "steps": 300, "batch_size": 32 },
        "rl": { "steps": steps, "problems_per_step": 5, "group_size": 4, "checkpoint_every": 1 },
        "eval": { "problems": 4, "samples": 1 }
    })
}

/// A warm start that solves some problems, made once in this process: every run starts RL
/// from it (`--init`).
fn warm_start() -> &'static Path {
    static WARM: OnceLock<PathBuf> = OnceLock::new();
    WARM.get_or_init(|| {
        let run = dir("warm");
        let mut c = RunConfig::default_for("search", "cpu-tiny", Algo::Grpo, 5, true).unwrap();
        c.model.d_model = 64;
        c.model.n_layers = 2;
        c.model.d_ff = 128;
        c.warm_start.steps = 300;
        c.warm_start.batch_size = 32;
        c.rl.steps = 1;
        c.rl.problems_per_step = 5;
        c.rl.group_size = 4;
        let opts = PipelineOptions {
            quiet: true,
            final_eval: false,
            ..PipelineOptions::new(c, &run)
        };
        run_pipeline::<Autodiff<Flex>>(&opts, &Default::default()).unwrap();
        run.join("checkpoints/warm_start.ckpt")
    })
}

/// Two free ports on the loopback address.
fn nodes() -> String {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    format!(
        "127.0.0.1:{},127.0.0.1:{}",
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port()
    )
}

/// A `train` command in `out` with the patch in `out/patch.json`: RL from the warm start.
fn train(out: &Path, name: &str, algo: Algo, seed: u64) -> Command {
    let mut c = fresh(out, name, algo, seed);
    c.arg("--init").arg(warm_start());
    c
}

/// [`train`] from a fresh model: the whole pipeline, warm start first.
fn fresh(out: &Path, name: &str, algo: Algo, seed: u64) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_train"));
    c.args(["--task", "search", "--preset", "cpu-tiny", "--device", "cpu", "--quiet"])
        .args(["--algo", algo.name(), "--seed", &seed.to_string()])
        .arg("--config")
        .arg(out.join("patch.json"))
        .arg("--out")
        .arg(out)
        .args(["--name", name])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn write_patch(out: &Path, steps: usize) {
    std::fs::write(out.join("patch.json"), patch(steps).to_string()).unwrap();
}

fn node(mut cmd: Command, nodes: &str, rank: usize) -> Child {
    cmd.args([
        "--nodes",
        nodes,
        "--node-rank",
        &rank.to_string(),
        "--node-timeout",
        "60",
    ]);
    cmd.spawn().unwrap()
}

/// The names of the files in a run directory and its checkpoints.
fn files(run: &Path) -> Vec<String> {
    let mut names: Vec<String> = ["", "checkpoints"]
        .iter()
        .flat_map(|d| std::fs::read_dir(run.join(d)).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs two nodes to the end; both must succeed.
fn two_nodes(leader: Command, follower: Command) {
    let n = nodes();
    let (a, b) = (node(leader, &n, 0), node(follower, &n, 1));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "rank 0: {}", stderr(&a));
    assert!(b.status.success(), "rank 1: {}", stderr(&b));
    assert!(stderr(&b).contains("rank 1 finished"), "{}", stderr(&b));
    // The transport's own logging stays off the terminal.
    for o in [&a, &b] {
        let text = String::from_utf8_lossy(&o.stdout).into_owned() + &stderr(o);
        assert!(!text.contains("burn_communication"), "{text}");
    }
}

/// Two processes on 127.0.0.1, one RL peer each, end two steps of `grpo` and of `mrt-dense`
/// (a shared evaluation between them) with the parameters one device trains on the same
/// problems, up to the order of the gradient sums.
#[test]
fn two_processes_train_what_one_device_trains() {
    for algo in [Algo::Grpo, Algo::MrtDense] {
        let name = algo.name();
        let out = dir(&format!("same-{name}"));
        write_patch(&out, 2);
        let one = train(&out, "one", algo, 5).output().unwrap();
        assert!(one.status.success(), "{}", stderr(&one));
        two_nodes(train(&out, "two", algo, 5), train(&out, "two", algo, 5));

        let (a, b) = (
            params(&out.join("one/checkpoints/final.ckpt")),
            params(&out.join("two/checkpoints/final.ckpt")),
        );
        let moved = relative_difference(&params(warm_start()), &a);
        let diff = relative_difference(&a, &b);
        eprintln!("{name}: parameters moved {moved:.3e} (relative); two processes vs one device {diff:.3e}");
        assert!(moved > 3e-5, "{name}: RL did not move the parameters ({moved:.3e})");
        assert!(
            diff <= 1e-6,
            "{name}: two processes differ from one device by {diff:.3e}"
        );
        // Only rank 0 wrote the run: the files of a one-process run, no more, no temporaries.
        assert_eq!(files(&out.join("one")), files(&out.join("two")));
        // The closing evaluations: the base (not evaluated in this run, whose warm start came
        // with --init) shared by both nodes, rank 0 sending it, gives one device's numbers; the
        // fine-tuned model (reused from RL's last evaluation) its rollouts (its parameters are
        // one device's up to the order of sums, so the meta-prover's J agree to ~1e-8 only).
        let closing = |run: &str| -> serde_json::Value {
            let text = std::fs::read_to_string(out.join(format!("{run}/summary.json"))).unwrap();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            serde_json::json!([v["base"], v["fine_tuned"]])
        };
        let (c1, c2) = (closing("one"), closing("two"));
        assert!(c1[0]["mean_tokens"].as_f64().unwrap() > 0.0);
        assert_eq!(c1[0], c2[0]);
        for key in ["pass1", "answered", "mean_episodes", "mean_tokens"] {
            assert_eq!(c1[1][key], c2[1][key], "{key}");
        }
        if algo == Algo::Grpo {
            // Resumed after its last step, neither model is reused: each node evaluates its
            // own fine-tuned copy, and the numbers are those RL's last (shared) evaluation of
            // the same parameters gave.
            let resume = || {
                let mut c = Command::new(env!("CARGO_BIN_EXE_train"));
                c.args(["--device", "cpu", "--quiet", "--resume"])
                    .arg(out.join("two"))
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                c
            };
            two_nodes(resume(), resume());
            assert_eq!(closing("two"), c2);
            let text = std::fs::read_to_string(out.join("two/metrics.jsonl")).unwrap();
            assert!(!text.contains("eval/reused"), "{text}");
        }
    }
}

/// Two processes warm-start a fresh model (each on half of every step's traces, with an
/// evaluation shared between them) and then take an RL step: the warm start and the final
/// parameters are one device's, up to the order of the gradient sums.
#[test]
fn two_processes_warm_start_what_one_device_warm_starts() {
    let out = dir("warm-start");
    let mut p = patch(1);
    p["warm_start"] = serde_json::json!({ "steps": 20, "batch_size": 32, "eval_every": 10, "checkpoint_every": 10 });
    std::fs::write(out.join("patch.json"), p.to_string()).unwrap();
    let one = fresh(&out, "one", Algo::Grpo, 5).output().unwrap();
    assert!(one.status.success(), "{}", stderr(&one));
    two_nodes(fresh(&out, "two", Algo::Grpo, 5), fresh(&out, "two", Algo::Grpo, 5));
    for ckpt in ["warm_start", "final"] {
        let path = |run: &str| out.join(format!("{run}/checkpoints/{ckpt}.ckpt"));
        let diff = relative_difference(&params(&path("one")), &params(&path("two")));
        eprintln!("{ckpt}: two processes vs one device {diff:.3e}");
        assert!(
            diff <= 1e-6,
            "{ckpt}: two processes differ from one device by {diff:.3e}"
        );
    }
    let evals = |run: &str| -> Vec<String> {
        let text = std::fs::read_to_string(out.join(format!("{run}/metrics.jsonl"))).unwrap();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r["phase"] == "warm-start" && r.get("eval/pass@1").is_some())
            .map(|r| format!("{} {} {}", r["step"], r["eval/pass@1"], r["eval/mean_tokens"]))
            .collect()
    };
    assert_eq!(evals("one").len(), 2);
    assert_eq!(evals("one"), evals("two"));
}

/// Killing the follower mid-run stops the leader within 60 s with an error naming rank 1,
/// and the other way round; `latest.ckpt` loads, and the run resumed on two nodes ends with
/// the parameters of an uninterrupted two-node run.
#[test]
fn a_killed_node_stops_the_other_and_the_run_resumes() {
    let steps = 8;
    let out = dir("kill");
    write_patch(&out, steps);
    two_nodes(train(&out, "whole", Algo::Grpo, 5), train(&out, "whole", Algo::Grpo, 5));

    for (killed, survivor) in [(1usize, 0usize), (0, 1)] {
        let run = out.join(format!("cut{killed}"));
        let name = format!("cut{killed}");
        let n = nodes();
        let mut ranks = [
            node(train(&out, &name, Algo::Grpo, 5), &n, 0),
            node(train(&out, &name, Algo::Grpo, 5), &n, 1),
        ];
        let latest = run.join("checkpoints/latest.ckpt");
        let t = Instant::now();
        while !latest.exists() {
            assert!(t.elapsed() < Duration::from_secs(300), "no checkpoint after 300 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        ranks[killed].kill().unwrap();
        let killed_at = Instant::now();
        let [a, b] = ranks;
        let out_survivor = if survivor == 0 { a } else { b }.wait_with_output().unwrap();
        let waited = killed_at.elapsed();
        let msg = stderr(&out_survivor);
        assert!(
            !out_survivor.status.success(),
            "rank {survivor} finished after rank {killed} was killed"
        );
        assert!(
            msg.contains(&format!("data-parallel peer {killed}: lost")),
            "rank {survivor} did not name rank {killed}: {msg}"
        );
        assert!(!msg.contains("panicked"), "{msg}");
        assert!(
            waited < Duration::from_secs(60),
            "rank {survivor} took {waited:?} to stop"
        );
        eprintln!("rank {killed} killed: rank {survivor} stopped after {waited:?}");
        checkpoint::load(&latest, None).unwrap();

        // Resumed on two nodes (rank 1 needs no run directory: rank 0 sends it the state).
        let resume = || {
            let mut c = Command::new(env!("CARGO_BIN_EXE_train"));
            c.args(["--device", "cpu", "--quiet", "--resume"])
                .arg(&run)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            c
        };
        two_nodes(resume(), resume());
        assert_eq!(
            params(&out.join("whole/checkpoints/final.ckpt")),
            params(&run.join("checkpoints/final.ckpt")),
            "the resumed run (rank {killed} killed) ends elsewhere"
        );
    }
}

/// Nodes started with different seeds are refused before any work, each with the same
/// message, and rank 0 writes nothing.
#[test]
fn nodes_with_different_configurations_are_refused_at_start_up() {
    let out = dir("mismatch");
    write_patch(&out, 2);
    let n = nodes();
    let a = node(train(&out, "run", Algo::Grpo, 5), &n, 0);
    let b = node(train(&out, "run", Algo::Grpo, 6), &n, 1);
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    for o in [&a, &b] {
        assert!(!o.status.success());
        let msg = stderr(o);
        assert!(
            msg.contains("data-parallel peer 1: started with a different configuration than peer 0 (differs in: seed)"),
            "{msg}"
        );
    }
    assert!(!out.join("run/config.json").exists());
}

/// The exchange itself, two nodes in two threads of this process: payloads longer than one
/// transfer's piece (64 MiB) arrive whole and in rank order, and payloads of different
/// lengths are gathered in one call; prints the rate.
#[test]
fn large_gathers_arrive_whole_across_pieces() {
    let n = nodes();
    let pattern = |len: usize, salt: u8| -> Vec<u8> { (0..len).map(|i| (i % 251) as u8 ^ salt).collect() };
    let big = (64 << 20) + 3;
    let run = |rank: usize| {
        let n = n.clone();
        std::thread::spawn(move || {
            let g = NodeGroup::join(&n, rank, Duration::from_secs(30)).unwrap();
            let mine = if rank == 0 { pattern(big, 7) } else { pattern(10, 9) };
            let all = g.gather(&mine, false).unwrap();
            assert_eq!(all.len(), 2);
            assert!(all[0] == pattern(big, 7), "rank {rank}: rank 0's bytes differ");
            assert_eq!(all[1], pattern(10, 9), "rank {rank}");
            let t = Instant::now();
            for _ in 0..3 {
                let all = g.gather(&pattern(big, rank as u8), false).unwrap();
                assert_eq!(all[1 - rank].len(), big);
            }
            let s = t.elapsed().as_secs_f64() / 3.0;
            g.finish();
            s
        })
    };
    let (a, b) = (run(0), run(1));
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    eprintln!(
        "64 MiB each way between two nodes on 127.0.0.1: {:.2} s per gather ({:.2} GB/s received per node)",
        a.max(b),
        big as f64 / a.max(b) / 1e9
    );
}
