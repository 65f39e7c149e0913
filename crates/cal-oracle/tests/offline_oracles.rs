//! The offline oracles on hand-written GSM8K-style solutions.

use cal_oracle::{calculator, reference, Verdict};
use proptest::prelude::*;

/// (response, expected first wrong segment or None for "no error").
const CALCULATOR_CASES: &[(&str, Option<&str>)] = &[
    // wrong steps, plain statements
    ("She sells 3 * 6 = 16 muffins. 24 - 16 = 8.\n#### 8", Some("3 * 6 = 16")),
    ("He reads 12 * 5 = 60 pages. 60 + 20 = 90 pages.\n#### 90", Some("60 + 20 = 90")),
    ("16 - 3 - 4 = 8 eggs are sold. 8 * 2 = 16 dollars.\n#### 16", Some("16 - 3 - 4 = 8")),
    ("The total is $1,200 + $350 = $1,500.\n#### 1500", Some("$1,200 + $350 = $1,500")),
    ("Each gets 45 / 5 = 8 candies.\n#### 8", Some("45 / 5 = 8")),
    ("2 x 7 = 15 legs.\n#### 15", Some("2 x 7 = 15")),
    ("3 × 4 = 12 and 12 ÷ 3 = 5.\n#### 5", Some("12 ÷ 3 = 5")),
    ("A 20% tip is 20% * 50 = 12 dollars.\n#### 12", Some("20% * 50 = 12")),
    ("She walks 2.5 * 4 = 11 miles.\n#### 11", Some("2.5 * 4 = 11")),
    ("(3 + 5) * 2 = 14 apples.\n#### 14", Some("(3 + 5) * 2 = 14")),
    ("Step 1: 7 + 8 = 15.\nStep 2: 15 * 3 = 35.\n#### 35", Some("15 * 3 = 35")),
    ("First 10 + 5 = 15, then 15 - 7 = 9, then 9 * 2 = 18.\n#### 18", Some("15 - 7 = 9")),
    ("**4 * 25 = 110** cents.\n#### 110", Some("4 * 25 = 110")),
    ("Running total: 3 * 4 = 12 + 5 = 18.\n#### 18", Some("12 + 5 = 18")),
    ("He pays 100 - 35 = 75 dollars.\n#### 75", Some("100 - 35 = 75")),
    ("-4 + 10 = 5 degrees.\n#### 5", Some("-4 + 10 = 5")),
    ("The area is 12 * 12 = 124 square feet.\n#### 124", Some("12 * 12 = 124")),
    // wrong calculator notes
    ("Natalia sold 48/2 = <<48/2=23>>23 clips in May.\n#### 71", Some("48/2 = <<48/2=23>>23")),
    ("She earns <<12*5=65>>65 dollars.\n#### 65", Some("12*5=65")),
    ("48/2 = <<48/2=24>>24 clips. 48+24 = <<48+24=62>>62 clips.\n#### 62", Some("48+24 = <<48+24=62>>62")),
    // a right note with a wrongly copied result
    ("Weng earns 12/60 * 50 = <<12/60*50=10>>11 dollars.\n#### 11", Some("12/60 * 50 = <<12/60*50=10>>11")),
    ("The cost is 3 * $1.50 = $4.60.\n#### 4.60", Some("3 * $1.50 = $4.60")),
    ("7 + 6 = 13 and 13 + 9 = 21 and 21 - 4 = 17.\n#### 17", Some("13 + 9 = 21")),
    ("1. 5 * 5 = 25\n2. 25 + 5 = 35\n#### 35", Some("25 + 5 = 35")),
    // correct solutions: no error
    ("She sells 3 * 6 = 18 muffins. 24 - 18 = 6.\n#### 6", None),
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72 clips.\n#### 72", None),
    ("16 - 3 - 4 = 9 eggs. 9 * 2 = $18.\n#### 18", None),
    ("10 / 3 = 3.33 per person, so about 3.\n#### 3", None),
    ("The total is $1,200 + $350 = $1,550.\n#### 1,550", None),
    ("3 * 4 = 12 + 5 = 17 in all.\n#### 17", None),
    ("He has 5 apples and buys 3 more, so he has 8.\n#### 8", None),
    ("x = 5 and y = 10, so x + y = 15.\n#### 15", None),
    ("In 2023 she was 12 years old; 2023 - 12 = 2011.\n#### 2011", None),
    ("A 25% discount on $80 is 0.25 * 80 = $20.\n#### 20", None),
    // wrong final answer without any arithmetic: the calculator cannot see it
    ("He probably has 12 apples.\n#### 12", None),
];

#[test]
fn calculator_table() {
    assert!(CALCULATOR_CASES.len() >= 30);
    let mut failures = Vec::new();
    for (response, want) in CALCULATOR_CASES {
        let got = match calculator::check(response) {
            Verdict::Segment { text, range } => {
                assert_eq!(&response[range.unwrap()], text);
                Some(text)
            }
            Verdict::NoError => None,
        };
        if got.as_deref() != *want {
            failures.push(format!("{response:?}: got {got:?}, want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn reference_oracle() {
    let q = "Janet's ducks lay 16 eggs per day. She eats 3 and bakes with 4. She sells the rest for $2 each. How much does she make?";
    let r = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18";
    let seg = |t: &str| Some(t.to_string());
    let cases: &[(&str, Option<String>)] = &[
        ("16 - 3 - 4 = 9 eggs. 9 * 2 = 18 dollars.\n#### 18", None),
        // right arithmetic on a wrong quantity: the calculator misses it, the reference catches it
        (
            "16 - 3 = 13 eggs. 13 * 2 = 26 dollars.\n#### 26",
            seg("16 - 3 = 13"),
        ),
        // wrong arithmetic is also a wrong value
        (
            "16 - 3 - 4 = 9 eggs. 9 * 2 = 20 dollars.\n#### 20",
            seg("9 * 2 = 20"),
        ),
        // no arithmetic written: the sentence with the first unknown number
        (
            "She has 9 eggs left. She makes 20 dollars.\n#### 20",
            seg("She makes 20 dollars."),
        ),
    ];
    for (resp, want) in cases {
        let got = match reference::check(q, r, resp) {
            Verdict::Segment { text, .. } => Some(text),
            Verdict::NoError => None,
        };
        assert_eq!(&got, want, "{resp}");
    }
    assert_eq!(calculator::check(cases[1].0), Verdict::NoError);
}

proptest! {
    #[test]
    fn never_panics(s in "\\PC{0,300}") {
        let _ = calculator::check(&s);
        let _ = reference::check("q 1 2", "1 + 2 = <<1+2=3>>3\n#### 3", &s);
    }

    #[test]
    fn never_panics_on_arithmetic_soup(s in "[0-9 +*/xX=<>$,.%()\\-a-z\n]{0,120}") {
        if let Verdict::Segment { text, range } = calculator::check(&s) {
            prop_assert_eq!(&s[range.unwrap()], text.as_str());
        }
        let _ = reference::check("", "", &s);
    }

    #[test]
    fn true_sums_pass_false_sums_fail(a in 0u32..10_000, b in 0u32..10_000, off in 1u32..50) {
        let ok = format!("So {a} + {b} = {} in total.", a + b);
        prop_assert_eq!(calculator::check(&ok), Verdict::NoError);
        let bad = format!("So {a} + {b} = {} in total.", a + b + off);
        let is_segment = matches!(calculator::check(&bad), Verdict::Segment { .. });
        prop_assert!(is_segment);
    }
}
