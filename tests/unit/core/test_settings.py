"""Settings: generated secrets in .env, environment overrides, ports that never collide."""

import stat

from flywheel.core.settings import GENERATED_SECRETS, Settings, ensure_env_file, read_env_file


def test_first_run_generates_every_secret_once(tmp_path):
    first = Settings.load({"FLYWHEEL_REPO": str(tmp_path)}, create_secrets=True)
    env_file = tmp_path / ".env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert all(first.secrets[name] for name in GENERATED_SECRETS)
    assert len(first.secrets["AIRFLOW__API_AUTH__JWT_SECRET"]) >= 64
    again = Settings.load({"FLYWHEEL_REPO": str(tmp_path)}, create_secrets=True)
    assert again.secrets == first.secrets


def test_existing_values_are_kept_and_missing_ones_added(tmp_path):
    (tmp_path / ".env").write_text("# mine\nMINIO_ROOT_USER='alice'\n")
    s = Settings.load({"FLYWHEEL_REPO": str(tmp_path)}, create_secrets=True)
    assert s.secrets["MINIO_ROOT_USER"] == "alice"
    assert read_env_file(tmp_path / ".env")["MINIO_ROOT_PASSWORD"] == s.secrets["MINIO_ROOT_PASSWORD"]


def test_environment_overrides_file_and_ports(tmp_path):
    (tmp_path / ".env").write_text("MINIO_ROOT_USER=alice\n")
    s = Settings.load({"FLYWHEEL_REPO": str(tmp_path), "MINIO_ROOT_USER": "bob", "FLYWHEEL_NGINX_PORT": "18000"})
    assert s.secrets["MINIO_ROOT_USER"] == "bob"
    assert s.ports.nginx == 18000
    assert s.predict_url == "http://127.0.0.1:18000"
    assert s.port_env()["FLYWHEEL_NGINX_PORT"] == "18000"


def test_loading_without_create_writes_nothing(tmp_path):
    Settings.load({"FLYWHEEL_REPO": str(tmp_path)})
    assert not (tmp_path / ".env").exists()


def test_default_ports_are_distinct_and_below_the_bento_blocks(tmp_path):
    s = Settings.load({"FLYWHEEL_REPO": str(tmp_path)})
    fixed = [v for k, v in vars(s.ports).items() if k != "bento_base"]
    assert len(set(fixed)) == len(fixed)
    assert not [p for p in fixed if s.ports.bento_base <= p < s.ports.bento_base + 100 * 16]


def test_an_env_file_made_by_hand_is_made_private(tmp_path):
    env = tmp_path / ".env"
    env.write_text("MINIO_ROOT_PASSWORD=typed-by-hand\n")  # `cp .env.example .env` and an editor: 644
    env.chmod(0o644)
    values = ensure_env_file(env)
    assert values["MINIO_ROOT_PASSWORD"] == "typed-by-hand"
    assert env.stat().st_mode & 0o777 == 0o600
