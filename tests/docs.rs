//! Man pages and completions: one file per command and shell, each naming every real flag.

use boft::cli::docs;

#[test]
fn man_pages_and_completions_name_every_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let written = docs::install(tmp.path()).unwrap();
    assert_eq!(written.len(), 4 * 4);
    for cmd in docs::commands() {
        let name = cmd.get_name().to_string();
        let longs: Vec<String> = cmd
            .get_arguments()
            .filter_map(|a| a.get_long())
            .map(|l| format!("--{l}"))
            .collect();
        // A flag each command really has (boft-extract reads checkpoints, not adapters).
        let own = if name == "boft-extract" {
            "--tuned"
        } else {
            "--from"
        };
        assert!(longs.iter().any(|l| l == own), "{name}: {longs:?}");
        let read = |rel: String| {
            let p = tmp.path().join(&rel);
            assert!(written.contains(&p), "{rel} not reported");
            std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{rel}: {e}"))
        };
        // roff escapes every hyphen; fish lists long flags without their dashes.
        let man = read(format!("share/man/man1/{name}.1")).replace("\\-", "-");
        assert!(man.contains(&format!(".TH {name}")), "{name}.1");
        let bash = read(format!("share/bash-completion/completions/{name}"));
        let zsh = read(format!("share/zsh/site-functions/_{name}"));
        let fish = read(format!("share/fish/vendor_completions.d/{name}.fish"));
        assert!(zsh.starts_with(&format!("#compdef {name}")), "_{name}");
        for l in &longs {
            assert!(man.contains(l.as_str()), "{name}.1 lacks {l}");
            assert!(bash.contains(l.as_str()), "bash {name} lacks {l}");
            assert!(zsh.contains(l.as_str()), "zsh {name} lacks {l}");
            let bare = format!("-l {}", &l[2..]);
            assert!(fish.contains(&bare), "fish {name} lacks {l}");
        }
    }
}
