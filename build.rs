//! Generates the man pages from the command-line definition in src/cli.rs (which depends on
//! clap only, for this reason): `ldap2scim.1` and one `ldap2scim-COMMAND.1` per command, like
//! git's. They are written to OUT_DIR and copied to `target/<profile>/man/`, where `cargo deb`
//! picks them up.

#[allow(dead_code)]
#[path = "src/cli.rs"]
mod cli;

use std::path::{Path, PathBuf};

fn render(command: clap::Command, dir: &Path, file: &str) -> std::io::Result<()> {
    let mut page = Vec::new();
    clap_mangen::Man::new(command).render(&mut page)?;
    std::fs::write(dir.join(file), page)
}

fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=src/cli.rs");
    println!("cargo:rerun-if-changed=build.rs");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let man_dir = out_dir.join("man");
    std::fs::create_dir_all(&man_dir)?;
    let command = <cli::Cli as clap::CommandFactory>::command();
    render(command.clone(), &man_dir, "ldap2scim.1")?;
    for sub in command.get_subcommands() {
        let name = format!("ldap2scim-{}", sub.get_name());
        render(
            sub.clone()
                .name(name.clone())
                .bin_name(format!("ldap2scim {}", sub.get_name())),
            &man_dir,
            &format!("{name}.1"),
        )?;
    }
    // OUT_DIR is <target>/<profile>/build/ldap2scim-<hash>/out; cargo deb reads
    // target/release/man/ (it maps target/release to the real target directory).
    if let Some(profile_dir) = out_dir.ancestors().nth(3) {
        let dest = profile_dir.join("man");
        if std::fs::create_dir_all(&dest).is_ok() {
            for entry in std::fs::read_dir(&man_dir)?.flatten() {
                let _ = std::fs::copy(entry.path(), dest.join(entry.file_name()));
            }
        }
    }
    Ok(())
}
