//! `kvloft topology [--check FILE]`.

use kvloft_topology::{discover, placement, render, validate};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::ExitCode;

/// Prints the discovered machine as TOML, or checks `check` against it.
pub fn run(check: Option<&Path>) -> anyhow::Result<ExitCode> {
    let machine = discover()?;
    let Some(path) = check else {
        let checked = validate::embedded_default(&machine).map_err(|d| anyhow::anyhow!("{d}"))?;
        let placed = placement::place(&machine, &BTreeSet::new());
        print!("{}", render::render(&machine, &checked.topology, Some(&placed)));
        return Ok(ExitCode::SUCCESS);
    };
    match validate::load(path, &machine) {
        Ok(checked) => {
            for w in &checked.warnings {
                eprintln!("{w}");
            }
            let t = &checked.topology;
            println!(
                "{}: ok, {} on CPUs {}, pool {} ({})",
                path.display(),
                plural(t.shards.len(), "shard"),
                kvloft_topology::machine::compact_list(t.shards.iter().map(|s| s.cpu).collect::<BTreeSet<_>>()),
                bytesize::ByteSize(t.pool_bytes()).display().iec(),
                plural(checked.warnings.len(), "warning")
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(diagnostics) => {
            eprintln!("{diagnostics}");
            let errors = diagnostics.0.iter().filter(|d| d.is_error()).count();
            eprintln!("{}: {}", path.display(), plural(errors, "error"));
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `1 shard`, `2 shards`.
fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}
