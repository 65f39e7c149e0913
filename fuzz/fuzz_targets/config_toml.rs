//! The run configuration (TOML over defaults): any text is a configuration that
//! survives a round trip through its own TOML, or an error naming the config.
#![no_main]
use cal_train::config::RunConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match RunConfig::from_toml_str(&text, "fuzz.toml") {
        Ok(cfg) => {
            let toml = cfg.to_toml().expect("a resolved config serialises");
            let again = RunConfig::from_toml_str(&toml, "round-trip.toml")
                .unwrap_or_else(|e| panic!("printed config does not parse back: {e:#}\n{toml}"));
            assert_eq!(
                again.to_toml().unwrap(),
                toml,
                "round trip changed the config"
            );
        }
        Err(e) => assert!(format!("{e}").starts_with("config fuzz.toml"), "{e:#}"),
    }
});
