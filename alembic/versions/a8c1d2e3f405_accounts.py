"""accounts: users, login sessions, login failures; conversations get an owner

Existing conversations keep user_id NULL; the first admin account created claims
them (``accounts.add_user``), so a single-user install keeps its history.

Revision ID: a8c1d2e3f405
Revises: 4e4788d217f1
Create Date: 2026-12-02 00:40:00
"""
from typing import Sequence, Union

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "a8c1d2e3f405"
down_revision: Union[str, Sequence[str], None] = "4e4788d217f1"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "vc_user",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("password_hash", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("prefs", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("vc_user", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_vc_user_name"), ["name"], unique=True)

    op.create_table(
        "vc_login_session",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["vc_user.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("vc_login_session", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_vc_login_session_user_id"), ["user_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_vc_login_session_expires_at"), ["expires_at"], unique=False)

    op.create_table(
        "vc_login_failure",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("vc_login_failure", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_vc_login_failure_key"), ["key"], unique=False)
        batch_op.create_index(batch_op.f("ix_vc_login_failure_at"), ["at"], unique=False)

    with op.batch_alter_table("vc_conversation", schema=None) as batch_op:
        batch_op.add_column(sa.Column("user_id", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_vc_conversation_user_id"), ["user_id"], unique=False)
        batch_op.create_foreign_key("fk_vc_conversation_user_id", "vc_user", ["user_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("vc_conversation", schema=None) as batch_op:
        batch_op.drop_constraint("fk_vc_conversation_user_id", type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_vc_conversation_user_id"))
        batch_op.drop_column("user_id")
    with op.batch_alter_table("vc_login_failure", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_vc_login_failure_at"))
        batch_op.drop_index(batch_op.f("ix_vc_login_failure_key"))
    op.drop_table("vc_login_failure")
    with op.batch_alter_table("vc_login_session", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_vc_login_session_expires_at"))
        batch_op.drop_index(batch_op.f("ix_vc_login_session_user_id"))
    op.drop_table("vc_login_session")
    with op.batch_alter_table("vc_user", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_vc_user_name"))
    op.drop_table("vc_user")
