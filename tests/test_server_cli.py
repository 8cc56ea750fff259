"""`python -m k2jax.serve`: mistakes are one `error:` line before anything loads."""

import pytest

from k2jax import serve


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--port", "70000"], ["--port 70000", "0..65535"]),
        (["--max-batch", "0"], ["--max-batch", ">= 1"]),
        (["--num-pages", "1"], ["--num-pages", ">= 2"]),
    ],
)
def test_bad_flags_are_one_line(capsys, argv, words):
    with pytest.raises(SystemExit) as exited:
        serve.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert all(word in err for word in words), err


def test_missing_checkpoint_is_one_line(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    assert serve.main(["--checkpoint", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --checkpoint {missing}: no such directory\n"


def test_served_model_name_defaults():
    parser = serve.build_parser()
    assert serve._model_name(parser.parse_args([])) == serve.DEFAULT_MODEL_NAME
    assert serve._model_name(parser.parse_args(["--checkpoint", "/m/Kimi-K2-Thinking/"])) == (
        "Kimi-K2-Thinking"
    )
    named = parser.parse_args(["--checkpoint", "/m/x", "--served-model-name", "kimi"])
    assert serve._model_name(named) == "kimi"
