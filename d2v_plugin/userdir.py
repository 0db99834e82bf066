"""Print the directory to pass as ``--user-dir`` / ``common.user_dir``."""
import os


def user_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


if __name__ == "__main__":
    print(user_dir())
