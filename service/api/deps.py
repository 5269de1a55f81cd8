"""Dependencies shared by the routers, as Annotated aliases."""

from __future__ import annotations

from typing import Annotated, Iterator

from fastapi import Depends
from sqlalchemy.orm import Session

from service.artifacts import ArtifactStore, get_store
from service.config import Settings, get_settings
from service.db import new_session


def _session() -> Iterator[Session]:
    session = new_session()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _owner(settings: Annotated[Settings, Depends(get_settings)]) -> str:
    return settings.default_owner


SessionDep = Annotated[Session, Depends(_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
Owner = Annotated[str, Depends(_owner)]
