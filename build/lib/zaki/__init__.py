"""Zaki: one private OpenClaw gateway per user."""
